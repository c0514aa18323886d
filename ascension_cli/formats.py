"""The format stamp and version of each file Ascension writes, in one place (a catalogue's are
in ``catalog/layout.py``). A reader refuses a file whose stamp is not its own, naming it."""

# A training checkpoint (``model/checkpoint.py``) and a catalogue's model file.
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "ascension-checkpoint", 1
MODEL_FILE_FORMAT = "ascension-catalog-model"
# A vectors file from ``embed`` (``embedding/vectors.py``).
VECTORS_FORMAT, VECTORS_VERSION = "ascension-vectors", 1
# identity.json of an embedding's parts folder (``embedding/parts.py``): the folder is ours.
PARTS_FORMAT = "ascension-embed-parts"
# Images per part (chunk) of a folder or manifest, unless --chunk-size says otherwise.
PARTS_CHUNK = 4096
# dataset.json beside shards (``data/shards.py``).
SHARD_FORMAT = "ascension-shards"
