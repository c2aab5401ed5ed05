"""Import the LEGO authors' checkpoints (``network-snapshot-*.pkl``) without running anything from them.

unpickle.py reads the pickle into inert records and tensors; convert.py checks the network's layout,
infers its config and maps its weights onto :class:`lego_export.model.LegoModel`.
"""

from lego_export.official.convert import Imported, describe, import_checkpoint, import_network

__all__ = ["Imported", "describe", "import_checkpoint", "import_network"]
