"""Typed errors. The library raises these; only the CLI turns them into messages."""


class MmsearchError(Exception):
    """Base class for every error mmsearch raises on purpose."""


class IndexNotFoundError(MmsearchError):
    """The index directory does not exist or holds no catalog."""


class EmptyIndexError(MmsearchError):
    """The index exists but has nothing to search."""


class IndexVersionError(MmsearchError):
    """The index was written by an incompatible version of mmsearch."""


class ModelMismatchError(MmsearchError):
    """The requested model differs from the one an index was built with."""


class WeightsUnavailableError(MmsearchError):
    """Pretrained weights could not be found or downloaded."""


class CheckpointError(MmsearchError):
    """A checkpoint file is missing, corrupt or not an mmsearch checkpoint."""


class MediaError(MmsearchError):
    """An image could not be opened or decoded. `reason` is a short, user-facing text."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class DatasetError(MmsearchError):
    """A caption dataset is malformed, empty or of an unknown format."""


class QueryError(MmsearchError):
    """A query is empty or cannot be parsed."""


class VectorIndexError(MmsearchError):
    """The FAISS index cannot be built or loaded as asked (bad factory string, too few vectors to train)."""


class UnknownModelError(MmsearchError):
    """No architecture of that name is known to open_clip or to mmsearch."""


class DeviceError(MmsearchError):
    """The requested torch device does not exist on this machine."""


class MissingExtraError(MmsearchError):
    """A model family needs an optional dependency (an extra such as mmsearch[siglip]) that is not installed."""


class DistributedError(MmsearchError):
    """Indexing on a cluster cannot go on as asked (Ray missing, a node cannot read the images or the model)."""


class TrainingError(MmsearchError):
    """A training run cannot start or continue as asked (bad batch split, precision, world size)."""


class ShardMapError(ModelMismatchError):
    """A sharded index and its shards disagree (a shard of another model, a shard missing, a bad shard map):
    refused like a model mismatch, before anything is searched or changed."""


class ShardUnavailableError(MmsearchError):
    """A shard needed to answer (the owner of an image asked for by id) does not answer right now."""


class NotServableError(MmsearchError):
    """A stored file may not be read by a server: the index records no folder holding it (storage/roots.py)."""


class FileGoneError(NotServableError):
    """A stored file is no longer on disk (moved or deleted since it was indexed)."""


class ArgumentError(MmsearchError, ValueError):
    """A library call got a value outside its range (a batch size below 1, a NaN threshold): what the
    CLI's option types refuse at its edge, refused again for callers of the Python API."""


class IndexBusyError(MmsearchError):
    """Another process (or thread) is writing the index: one writer at a time (mmsearch.storage.lock)."""


class IndexReadOnlyError(MmsearchError):
    """The index folder or its catalog cannot be written (permissions, a read-only disk): search only."""


class CatalogCorruptError(MmsearchError):
    """The catalog's SQLite file is damaged or not a database; the message says what to do."""


class NonFiniteVectorError(MmsearchError):
    """A vector holds NaN or infinity; it is refused wherever vectors come in (mmsearch.storage.schema.check_finite)."""


class WatchError(MmsearchError):
    """A watcher cannot start or go on as asked (no folder to watch, a bad ignore name or poll interval)."""
