"""Model folder I/O: lazy validated loading, streaming sharded writing, atomic output."""

from mergekit_bico.io.loader import SAFETENSORS_DTYPES, WEIGHT_LAYOUTS, LazyModel
from mergekit_bico.io.writer import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    ShardedWriter,
    atomic_output_dir,
    check_output_dir,
    cleanup_stale_partials,
    copy_support_files,
    parse_size,
)

__all__ = [
    "LazyModel",
    "SAFETENSORS_DTYPES",
    "WEIGHT_LAYOUTS",
    "ShardedWriter",
    "atomic_output_dir",
    "check_output_dir",
    "cleanup_stale_partials",
    "copy_support_files",
    "parse_size",
    "CONFIG_FILES",
    "TOKENIZER_FILES",
]
