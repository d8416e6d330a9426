//go:build !amd64

package compute

// haveAsm is false: this architecture runs the portable kernels only.
const haveAsm = false

func dotF32AVX2(a, b *float32, n int) float32     { panic("unreachable") }
func axpyF32AVX2(a float32, x, y *float32, n int) { panic("unreachable") }
func gemm4x3F32AVX2(x *float32, ldx int, w *float32, ldw int, k int, out *float32, ldo int) {
	panic("unreachable")
}
func dotF16AVX2(w *uint16, x *float32, n int) float32          { panic("unreachable") }
func dotQ8AVX2(w *byte, xq *int8, xd *float32, nb int) float32 { panic("unreachable") }
func f16ToF32AVX2(dst *float32, src *uint16, n int)            { panic("unreachable") }
func dequantQ8AVX2(dst *float32, src *byte, nb int)            { panic("unreachable") }
