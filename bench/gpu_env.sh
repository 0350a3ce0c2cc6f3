# Source from the repo root on an offline GPU host: packages carried in .gpu-site/ and .gpu-wheels/, NVLink
# multicast off (shared hosts), one cache for the random-weight checkpoints.
mkdir -p /tmp/qfsdp-extra
[ -d /tmp/qfsdp-extra/transformers ] || python3 -m zipfile -e .gpu-wheels/transformers-*.whl /tmp/qfsdp-extra
export PYTHONPATH=/tmp/qfsdp-extra:$PWD/.gpu-site:$PWD:${PYTHONPATH:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export QFSDP_CACHE=${QFSDP_CACHE:-/tmp/qfsdp-cache}
