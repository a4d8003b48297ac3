"""Storage: the catalog (SQLite, the source of truth), the vector index (FAISS, a cache rebuilt
from the catalog), the automatic ANN choice, the index record that wires them, and import/export."""
