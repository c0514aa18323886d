"""The format stamp and version of each file Ascension writes, in one place (a catalogue's are
in ``catalog_layout.py``), and the facts several layers share: a run folder's file names, the
default pixel limit. A reader refuses a file whose stamp is not its own, naming it."""

# A training checkpoint (``model/checkpoint.py``) and a catalogue's model file.
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "ascension-checkpoint", 1
MODEL_FILE_FORMAT = "ascension-catalog-model"
# A vectors file from ``embed`` (``embedding/vectors.py``). Version 2 keeps its strings (paths,
# classes, item ids) variable-length (``strings.py``); version 1 files still read.
VECTORS_FORMAT, VECTORS_VERSION, VECTORS_READABLE = "ascension-vectors", 2, (1, 2)
# identity.json of an embedding's parts folder (``embedding/parts.py``): the folder is ours.
PARTS_FORMAT = "ascension-embed-parts"
# Images per part (chunk) of a folder or manifest, unless --chunk-size says otherwise.
PARTS_CHUNK = 4096
# dataset.json beside shards (``data/shards.py``).
SHARD_FORMAT = "ascension-shards"
# A training run's folder: its checkpoints (``train/``) and what embed and eval read of it.
LAST_CHECKPOINT, BEST_CHECKPOINT, RUN_CONFIG = "last.pt", "best.pt", "config.yaml"
# Images with more pixels than this are refused unless an option says otherwise (decompression
# bombs): --max-image-pixels of train, index, search, calibrate and serve, and every decoder.
DEFAULT_MAX_PIXELS = 100_000_000
