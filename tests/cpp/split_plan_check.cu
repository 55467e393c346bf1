// Prints kda_cuda.cu's split_plan (how many pieces, which recurrence V slice) for the shapes given
// on the command line as T:H:N (dense: N sequences of T tokens) or T:H:N:v (varlen: N sequences of
// T tokens in all), for an H100-like device (132 multiprocessors, 227 KB per block).
// Host code only: it runs without a GPU. Built by tests/test_cuda_compile.py, which includes the .cu
// to reach its anonymous namespace.
#include "cuda/kda_cuda.cu"

#include <cstdio>

int main(int argc, char** argv) {
  using namespace flash_kda;
  port::DeviceInfo dev{};
  dev.multiprocessors = 132;
  dev.max_smem_per_block = 227 * 1024;
  dev.smem_per_multiprocessor = 228 * 1024;
  dev.major = 9;
  for (int i = 1; i < argc; ++i) {
    int T = 0, H = 0, N = 0;
    char kind = 'd';
    const int fields = std::sscanf(argv[i], "%d:%d:%d:%c", &T, &H, &N, &kind);
    if (fields < 3 || (fields == 4 && kind != 'v')) return 2;
    // split_plan reads only whether cu_seqlens is set (the host cannot see its values)
    static const int64_t kUnread[1] = {0};
    KdaParams p{};
    if (kind == 'v') p.cu_seqlens = kUnread;
    p.num_seqs = N;
    p.seq_len = T;
    p.hqk = H;
    p.hv = H;
    p.head_dim = kHeadDim;
    const SplitPlan plan = split_plan(p, dev);
    std::printf("%s %lld %d\n", argv[i], static_cast<long long>(plan.pieces), plan.vs);
  }
  return 0;
}
