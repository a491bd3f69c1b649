"""Real-data sources: a user's local download -> the standard image table (see ``table``).

One module per dataset (``mimic_cxr``, ``chexpert``, ``folder``), each with
``load_table(root, ...) -> pandas.DataFrame`` (one row per image); ``table.group_studies``
turns a table into studies and ``examples.generate`` into study-feature examples, which the
TFDS builders in ``cxrjax.data.builders`` write. Nothing here downloads anything.
"""
from cxrjax.data.sources.folder import FolderSpec
from cxrjax.data.sources.images import load_image, resize_square
from cxrjax.data.sources.table import (SPLITS, TABLE_COLUMNS, SkipLog, Study, group_studies,
                                       select_views)

__all__ = ["FolderSpec", "load_image", "resize_square", "SPLITS", "TABLE_COLUMNS", "SkipLog",
           "Study", "group_studies", "select_views"]
