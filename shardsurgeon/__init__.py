"""shardsurgeon: rewrite Hugging Face safetensors checkpoints layer by layer, streaming.

The public API: everything the command line uses, and what a program or a test needs to plan, write
and check a checkpoint, is importable from here; the modules behind it may move.

    job = plan_expand("./openchat-3.5-0106", dups=[(31, 12)], zero=["o_proj", "down_proj"])
    run_job(job, "./openchat-44", command="...", options=WriteOptions(checksums=True))
    verify_checkpoint("./openchat-44", ["./openchat-3.5-0106"])
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from shardsurgeon.api import (
    card_of,
    destination_of,
    plan_dense_expert,
    plan_expand,
    plan_merge,
    plan_moe,
    plan_prune_experts,
    plan_upcycle,
    plan_vocab,
    read_keep,
    read_remap,
    read_tokens,
    run_job,
)
from shardsurgeon.errors import (
    CheckpointError,
    DestinationError,
    FormatError,
    OutputError,
    PlanError,
    RecipeError,
    ShardSurgeonError,
    VerifyError,
    safe_text,
)
from shardsurgeon.format import (
    CAST_TARGETS,
    DTYPES,
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    Header,
    HeaderEntry,
    decode_header,
    encode_header,
    read_header,
    tensor_nbytes,
)
from shardsurgeon.model.arch import NO_HINT, LayerStack, SourceLayer, StackHint, find_layer_stack, patch_config
from shardsurgeon.model.checkpoint import Checkpoint, Shard, TensorRef, open_checkpoint, resolve_cache_entry
from shardsurgeon.model.describe import describe_checkpoint
from shardsurgeon.model.hfcache import card_names
from shardsurgeon.model.routerfile import RouterFile, open_router_file
from shardsurgeon.model.source import Source, open_source, resolve
from shardsurgeon.names import CHECKSUMS_FILE, CONFIG_FILE, INDEX_FILE, PARTIAL_SUFFIX, RESUME_NAME, SINGLE_FILE
from shardsurgeon.plan.dense import SharedExpert
from shardsurgeon.plan.expected import by_definition
from shardsurgeon.plan.experts import KeepSpec, parse_keep
from shardsurgeon.plan.job import Job, job_layout
from shardsurgeon.plan.layout import (
    BLOCK_BYTES,
    DEFAULT_MAX_SHARD_BYTES,
    CopyRun,
    Layout,
    PlacedTensor,
    ShardLayout,
    plan_layout,
)
from shardsurgeon.plan.mergekit_options import MERGEKIT_FLAGS, MergekitFlag, parse_out_shard_size
from shardsurgeon.plan.planfile import PlannedJob, load_plan_file, plan_file_bytes, write_plan_file
from shardsurgeon.plan.planner import Plan, make_plan
from shardsurgeon.plan.recipe import (
    DenseExpert,
    LayerSource,
    NewRows,
    NewToken,
    PruneExperts,
    Recipe,
    Router,
    RowInit,
    ScaleRule,
    SourceRows,
    Upcycle,
    VocabChange,
    expand_recipe,
    parse_dup,
    parse_filters,
    parse_layers,
    parse_router,
)
from shardsurgeon.plan.report import dry_run_text, plan_dict
from shardsurgeon.plan.tensors import Convert, Copy, MeanRows, PlannedTensor, Zeros
from shardsurgeon.plan.vocab_terms import ZERO_INIT, InitSpec, parse_init
from shardsurgeon.storage.remote import EXTRA_HINT as REMOTE_EXTRA_HINT
from shardsurgeon.storage.remote import file_name, is_url, normal_url, obstore_available
from shardsurgeon.storage.s3 import EXTRA_HINT as S3_EXTRA_HINT
from shardsurgeon.storage.s3 import boto3_available
from shardsurgeon.storage.versions import SourceVersion
from shardsurgeon.units import Progress, ShardStarted, format_bytes, parse_size
from shardsurgeon.verify.checker import Mismatch, VerifyReport, compare_with_plan, verify_checkpoint
from shardsurgeon.write.destination import FINALIZE, WHOLE, Part, RunResult, WriteOptions, writer
from shardsurgeon.write.executor import REFLINK_MODES, Reflink, ShardStats
from shardsurgeon.write.runners import InProcess, Processes, Runner, balanced_groups, select_shards

if TYPE_CHECKING:
    from shardsurgeon.demo import demo_folders, make_demo_checkpoint, mistral_config
    from shardsurgeon.write.raytasks import RayTasks

_LAZY = {"demo_folders", "make_demo_checkpoint", "mistral_config", "RayTasks"}
"""Exported, but imported on first use: the demo builds arrays with numpy, which nothing else loads."""


def __getattr__(name: str) -> object:
    if name == "RayTasks":
        from shardsurgeon.write.raytasks import RayTasks

        return RayTasks
    if name in _LAZY:
        from shardsurgeon import demo

        return getattr(demo, name)
    raise AttributeError(f"module 'shardsurgeon' has no attribute {name!r}")


__all__ = [
    "BLOCK_BYTES",
    "CAST_TARGETS",
    "CHECKSUMS_FILE",
    "CONFIG_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "DTYPES",
    "FINALIZE",
    "FLOAT_DTYPES",
    "INDEX_FILE",
    "MAX_HEADER_BYTES",
    "MERGEKIT_FLAGS",
    "NO_HINT",
    "PARTIAL_SUFFIX",
    "REFLINK_MODES",
    "REMOTE_EXTRA_HINT",
    "RESUME_NAME",
    "S3_EXTRA_HINT",
    "SINGLE_FILE",
    "WHOLE",
    "ZERO_INIT",
    "Checkpoint",
    "CheckpointError",
    "Convert",
    "Copy",
    "CopyRun",
    "DenseExpert",
    "DestinationError",
    "FormatError",
    "Header",
    "HeaderEntry",
    "InProcess",
    "InitSpec",
    "Job",
    "KeepSpec",
    "LayerSource",
    "LayerStack",
    "Layout",
    "MeanRows",
    "MergekitFlag",
    "Mismatch",
    "NewRows",
    "NewToken",
    "OutputError",
    "Part",
    "PlacedTensor",
    "Plan",
    "PlanError",
    "PlannedJob",
    "PlannedTensor",
    "Processes",
    "Progress",
    "PruneExperts",
    "RayTasks",
    "Recipe",
    "RecipeError",
    "Reflink",
    "Router",
    "RouterFile",
    "RowInit",
    "RunResult",
    "Runner",
    "ScaleRule",
    "Shard",
    "ShardLayout",
    "ShardStarted",
    "ShardStats",
    "ShardSurgeonError",
    "SharedExpert",
    "Source",
    "SourceLayer",
    "SourceRows",
    "SourceVersion",
    "StackHint",
    "TensorRef",
    "Upcycle",
    "VerifyError",
    "VerifyReport",
    "VocabChange",
    "WriteOptions",
    "Zeros",
    "balanced_groups",
    "boto3_available",
    "by_definition",
    "card_names",
    "card_of",
    "compare_with_plan",
    "decode_header",
    "demo_folders",
    "describe_checkpoint",
    "destination_of",
    "dry_run_text",
    "encode_header",
    "expand_recipe",
    "file_name",
    "find_layer_stack",
    "format_bytes",
    "is_url",
    "job_layout",
    "load_plan_file",
    "make_demo_checkpoint",
    "make_plan",
    "mistral_config",
    "normal_url",
    "obstore_available",
    "open_checkpoint",
    "open_router_file",
    "open_source",
    "parse_dup",
    "parse_filters",
    "parse_init",
    "parse_keep",
    "parse_layers",
    "parse_out_shard_size",
    "parse_router",
    "parse_size",
    "patch_config",
    "plan_dense_expert",
    "plan_dict",
    "plan_expand",
    "plan_file_bytes",
    "plan_layout",
    "plan_merge",
    "plan_moe",
    "plan_prune_experts",
    "plan_upcycle",
    "plan_vocab",
    "read_header",
    "read_keep",
    "read_remap",
    "read_tokens",
    "resolve",
    "resolve_cache_entry",
    "run_job",
    "safe_text",
    "select_shards",
    "tensor_nbytes",
    "verify_checkpoint",
    "write_plan_file",
    "writer",
]
