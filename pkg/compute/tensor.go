// Package compute runs the Llama forward pass one fragment at a time: the
// embedding, a contiguous range of layers, and the head. A Stage holds the
// weights of the fragments one executor serves; a Cache holds one request's
// keys and values for those layers. Forward takes a batch of items (a
// prompt's rows, or one decode row from each of several requests) so that
// weights are read once per batch.
package compute

import (
	"fmt"
)

// DType is the storage type of a weight matrix.
type DType uint8

// Weight storage types.
const (
	F32 DType = iota
	F16
	Q8_0
)

// String names the dtype as manifests spell it.
func (d DType) String() string {
	switch d {
	case F32:
		return "f32"
	case F16:
		return "f16"
	case Q8_0:
		return "q8_0"
	}
	return fmt.Sprintf("dtype(%d)", uint8(d))
}

// ParseDType parses a dtype name.
func ParseDType(s string) (DType, error) {
	switch s {
	case "f32", "":
		return F32, nil
	case "f16":
		return F16, nil
	case "q8_0":
		return Q8_0, nil
	}
	return 0, fmt.Errorf("unknown dtype %q (want f32, f16 or q8_0)", s)
}

// Matrix is a row-major weight matrix (Rows outputs × Cols inputs).
type Matrix struct {
	Rows, Cols int
	DType      DType
	// F32 holds the values when DType is F32.
	F32 []float32
}

// NewMatrixF32 wraps v (rows×cols, row-major) as a matrix.
func NewMatrixF32(rows, cols int, v []float32) *Matrix {
	if len(v) != rows*cols {
		panic(fmt.Sprintf("compute: matrix %d×%d given %d values", rows, cols, len(v)))
	}
	return &Matrix{Rows: rows, Cols: cols, DType: F32, F32: v}
}

// Bytes is the matrix's storage size.
func (m *Matrix) Bytes() int64 {
	return 4 * int64(m.Rows) * int64(m.Cols)
}
