package compute

import (
	"math/rand/v2"
	"testing"

	"github.com/tessera-grid/tessera/pkg/model"
)

// BenchmarkMatVec measures one matrix-vector product of the classifier's
// shape (32000×768), the largest of a decode step, in GB/s of weights read.
func BenchmarkMatVec(b *testing.B) {
	const rows, cols = 32000, 768
	r := rand.New(rand.NewPCG(1, 1))
	w := randVec(r, rows*cols)
	x := randVec(r, cols)
	q8, _ := model.AppendQ8_0(nil, w)
	f16 := model.AppendF16(nil, w)
	for _, tc := range []struct {
		name string
		m    *Matrix
	}{
		{"f32", NewMatrixF32(rows, cols, w)},
		{"f16", must(NewMatrix(rows, cols, F16, f16))},
		{"q8_0", must(NewMatrix(rows, cols, Q8_0, q8))},
	} {
		for _, threads := range []int{1, 2} {
			b.Run(tc.name+"/"+string(rune('0'+threads)), func(b *testing.B) {
				s := &Stage{pool: NewPool(threads)}
				out := make([]float32, rows)
				b.SetBytes(tc.m.Bytes())
				for i := 0; i < b.N; i++ {
					s.mm = matmulTask{x: x, rows: 1, np: 1, parts: [3]mmPart{{out, tc.m}}}
					s.matmul(&s.mm)
				}
			})
		}
	}
}

func must(m *Matrix, err error) *Matrix {
	if err != nil {
		panic(err)
	}
	return m
}
