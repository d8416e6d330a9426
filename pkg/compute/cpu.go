package compute

import "golang.org/x/sys/cpu"

// simd says which vector kernels this processor runs. It is decided once at
// start-up from the CPUID feature bits (golang.org/x/sys/cpu), like the
// standard library's own crypto and bytes kernels; every kernel has a
// portable Go version used where these are missing.
var simd = struct {
	// avx2 covers AVX2, FMA and F16C, which the amd64 kernels use together.
	avx2 bool
}{
	avx2: haveAsm && cpu.X86.HasAVX2 && cpu.X86.HasFMA && cpu.X86.HasF16C,
}

// KernelName names the kernels in use ("avx2" or "portable").
func KernelName() string {
	if simd.avx2 {
		return "avx2"
	}
	return "portable"
}
