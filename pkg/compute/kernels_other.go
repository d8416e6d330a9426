//go:build !amd64

package compute

// haveAsm is false: this architecture runs the portable kernels only.
const haveAsm = false

func dotF32AVX2(a, b *float32, n int) float32     { panic("unreachable") }
func axpyF32AVX2(a float32, x, y *float32, n int) { panic("unreachable") }
func gemm4x3F32AVX2(x *float32, ldx int, w *float32, ldw int, k int, out *float32, ldo int) {
	panic("unreachable")
}
func dotF16AVX2(w *uint16, x *float32, n int) float32 { panic("unreachable") }
func dotQ8AVX2(wq *int8, ws *uint16, xq *int8, xa *int8, xd *float32, ng int) float32 {
	panic("unreachable")
}
func f16ToF32AVX2(dst *float32, src *uint16, n int)           { panic("unreachable") }
func dequantQ8AVX2(dst *float32, q *int8, sc *uint16, nb int) { panic("unreachable") }

func attnOut4AVX2(o *float32, ldo int, p *float32, ldp int, v *float32, n int, hs int) {
	panic("unreachable")
}
func expSumAVX2(x *float32, n int, m float32) float32 { panic("unreachable") }
func maxF32AVX2(x *float32, n int) float32            { panic("unreachable") }
func swigluAVX2(gate, up *float32, n int)             { panic("unreachable") }
