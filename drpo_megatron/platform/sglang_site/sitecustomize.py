"""Start-up hook for SGLang server processes launched by drpo-megatron on a CPU-only machine.

This folder is put on ``PYTHONPATH`` of the server (and its spawned scheduler / detokenizer
children) only when there is no CUDA device; see ``drpo_megatron.platform.sglang_cpu``.
"""

from drpo_megatron.platform.sglang_cpu import (HOST_POOL_MODULE, SAMPLING_BATCH_INFO_MODULE,
                                               after_import, define_torchvision_op_schemas,
                                               honour_sampling_seeds, unpinned_cpu_host_buffers)

define_torchvision_op_schemas()
after_import(SAMPLING_BATCH_INFO_MODULE, honour_sampling_seeds)
after_import(HOST_POOL_MODULE, unpinned_cpu_host_buffers)
