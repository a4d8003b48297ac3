"""Search: parse a query, embed it, search the vectors, filter, hydrate rows, re-rank; near-duplicates."""
