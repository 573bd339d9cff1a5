"""Training beyond one device, wrapped around the single-device SAE, which knows nothing of ranks.

Data parallel: one process per device under ``torchrun``, each a whole replica reading its own tokens; SAELens's
unchanged trainer, with torch's DistributedDataParallel averaging the gradients. Expert parallel: the experts split
over the ranks, every token's assignments sent to their experts' owners. Both run through
``DistributedSAETrainingRunner``:

    torchrun --nproc-per-node 8 examples/train_gpt2_scale.py ...   # a script that runs, on every rank:
    DistributedSAETrainingRunner(cfg).run()                        # or (cfg, expert_parallel=True)
"""

from sae_lens_scale.parallel.checkpoints import merge_checkpoint
from sae_lens_scale.parallel.data import replicate_training_pass
from sae_lens_scale.parallel.experts import ExpertShard, ShardedExperts
from sae_lens_scale.parallel.process_group import ReplicaParts
from sae_lens_scale.parallel.runner import DataParallelRankError, DistributedSAETrainingRunner
from sae_lens_scale.parallel.shards import expert_parallel_sae

__all__ = [
    "DataParallelRankError",
    "DistributedSAETrainingRunner",
    "ExpertShard",
    "ReplicaParts",
    "ShardedExperts",
    "expert_parallel_sae",
    "merge_checkpoint",
    "replicate_training_pass",
]
