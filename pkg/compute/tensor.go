// Package compute runs the Llama forward pass one fragment at a time: the
// embedding, a contiguous range of layers, and the head. A Stage holds the
// weights of the fragments one executor serves; a Cache holds one request's
// keys and values for those layers. Forward takes a batch of items (a
// prompt's rows, or one decode row from each of several requests) so that
// weights are read once per batch.
package compute

import (
	"encoding/binary"
	"fmt"
	"math"
	"unsafe"

	"github.com/tessera-grid/tessera/pkg/model"
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

// Matrix is a row-major weight matrix (Rows outputs × Cols inputs), stored
// as float32, half precision, or q8_0 blocks (each row a whole number of
// 32-value blocks). Quantized matrices are computed on directly: their
// bytes are never expanded as a whole.
type Matrix struct {
	Rows, Cols int
	DType      DType
	// F32 holds the values when DType is F32.
	F32 []float32
	// Data holds the raw little-endian values for F16 (2 bytes each) and
	// Q8_0 (see model.Q8Block for the layout).
	Data []byte

	// q and scales view a Q8_0 matrix's values and block scales.
	q      []int8
	scales []uint16
}

// NewMatrixF32 wraps v (rows×cols, row-major) as a matrix.
func NewMatrixF32(rows, cols int, v []float32) *Matrix {
	if len(v) != rows*cols {
		panic(fmt.Sprintf("compute: matrix %d×%d given %d values", rows, cols, len(v)))
	}
	return &Matrix{Rows: rows, Cols: cols, DType: F32, F32: v}
}

// NewMatrix wraps raw values of the given dtype (rows×cols, row-major,
// little-endian) as a matrix sharing data's memory where alignment allows.
func NewMatrix(rows, cols int, dtype DType, data []byte) (*Matrix, error) {
	if rows <= 0 || cols <= 0 {
		return nil, fmt.Errorf("compute: matrix %d×%d", rows, cols)
	}
	if dtype == Q8_0 && cols%model.Q8Block != 0 {
		return nil, fmt.Errorf("compute: q8_0 matrix needs a multiple of %d columns, has %d", model.Q8Block, cols)
	}
	m := &Matrix{Rows: rows, Cols: cols, DType: dtype}
	want := m.Bytes()
	if dtype > Q8_0 {
		return nil, fmt.Errorf("compute: unknown dtype %v", dtype)
	}
	if int64(len(data)) != want {
		return nil, fmt.Errorf("compute: %v matrix %d×%d needs %d bytes, given %d", dtype, rows, cols, want, len(data))
	}
	switch dtype {
	case F32:
		if uintptr(unsafe.Pointer(&data[0]))%4 == 0 {
			m.F32 = unsafe.Slice((*float32)(unsafe.Pointer(&data[0])), rows*cols)
		} else {
			m.F32 = make([]float32, rows*cols)
			for i := range m.F32 {
				m.F32[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
			}
		}
	case F16:
		if uintptr(unsafe.Pointer(&data[0]))%2 != 0 {
			data = append([]byte(nil), data...)
		}
		m.Data = data
	case Q8_0:
		n := rows * cols
		if uintptr(unsafe.Pointer(&data[n]))%2 != 0 {
			data = append([]byte(nil), data...)
		}
		m.Data = data
		m.q = unsafe.Slice((*int8)(unsafe.Pointer(&data[0])), n)
		m.scales = f16s(data[n:])
	}
	return m, nil
}

// Bytes is the matrix's storage size.
func (m *Matrix) Bytes() int64 {
	n := int64(m.Rows) * int64(m.Cols)
	switch m.DType {
	case F16:
		return 2 * n
	case Q8_0:
		return n / model.Q8Block * model.Q8BlockBytes
	}
	return 4 * n
}

// Row writes row i's values into dst (Cols values), expanding quantized
// storage; the embedding looks tokens up this way.
func (m *Matrix) Row(i int, dst []float32) {
	dst = dst[:m.Cols]
	switch m.DType {
	case F32:
		copy(dst, m.F32[i*m.Cols:(i+1)*m.Cols])
	case F16:
		f16ToF32(dst, f16s(m.Data[i*2*m.Cols:(i+1)*2*m.Cols]))
	case Q8_0:
		nb := m.Cols / model.Q8Block
		dequantQ8(dst, m.q[i*m.Cols:(i+1)*m.Cols], m.scales[i*nb:(i+1)*nb])
	}
}
