package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"unsafe"
)

// A tensor frame is a 16-byte header followed by raw little-endian values:
//
//	0  magic "TSF1"
//	4  dtype (1 = f32, 2 = i32)
//	5  reserved, 0
//	6  reserved, 0 (uint16)
//	8  rows (uint32)
//	12 cols (uint32)
//	16 rows*cols values
//
// Request metadata travels in NATS headers (headers.go); the frame carries
// only the numbers.
const (
	frameMagic      = "TSF1"
	FrameHeaderSize = 16
	// MaxFrameValues bounds rows*cols so that a hostile header cannot make a
	// receiver allocate without limit (64 Mi values = 256 MiB).
	MaxFrameValues = 64 << 20
)

// DType of a tensor frame.
type DType uint8

// Frame dtypes.
const (
	F32 DType = 1
	I32 DType = 2
)

// ErrFrame is wrapped by every frame decoding error.
var ErrFrame = errors.New("tensor frame")

// Frame is a decoded tensor frame; Data aliases the message.
type Frame struct {
	DType DType
	Rows  int
	Cols  int
	Data  []byte
}

// AppendF32 appends a frame of rows×cols float32 values to dst.
func AppendF32(dst []byte, rows, cols int, v []float32) []byte {
	dst = appendHeader(dst, F32, rows, cols)
	if len(v) == 0 {
		return dst
	}
	return append(dst, unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*rows*cols)...)
}

// AppendI32 appends a frame of one row of int32 values (token ids) to dst.
func AppendI32(dst []byte, v []int32) []byte { return AppendI32Rows(dst, 1, len(v), v) }

// AppendI32Rows appends a frame of rows×cols int32 values to dst.
func AppendI32Rows(dst []byte, rows, cols int, v []int32) []byte {
	dst = appendHeader(dst, I32, rows, cols)
	if len(v) == 0 {
		return dst
	}
	return append(dst, unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*rows*cols)...)
}

func appendHeader(dst []byte, dt DType, rows, cols int) []byte {
	dst = append(dst, frameMagic...)
	dst = append(dst, byte(dt), 0, 0, 0)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(rows))
	dst = binary.LittleEndian.AppendUint32(dst, uint32(cols))
	return dst
}

// frameSize is the size of the frame whose header starts b (at least
// FrameHeaderSize bytes), checking the magic and the value limit.
func frameSize(b []byte) (int, error) {
	if string(b[:4]) != frameMagic {
		return 0, fmt.Errorf("%w: bad magic %q", ErrFrame, b[:4])
	}
	n := uint64(binary.LittleEndian.Uint32(b[8:])) * uint64(binary.LittleEndian.Uint32(b[12:]))
	if n > MaxFrameValues {
		return 0, fmt.Errorf("%w: %d values exceed the limit of %d", ErrFrame, n, MaxFrameValues)
	}
	return FrameHeaderSize + int(4*n), nil
}

// DecodeFrame parses b, checking the magic, dtype and that the payload
// length matches rows×cols exactly.
func DecodeFrame(b []byte) (Frame, error) {
	if len(b) < FrameHeaderSize {
		return Frame{}, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrFrame, len(b), FrameHeaderSize)
	}
	if string(b[:4]) != frameMagic {
		return Frame{}, fmt.Errorf("%w: bad magic %q at offset 0", ErrFrame, b[:4])
	}
	dt := DType(b[4])
	if dt != F32 && dt != I32 {
		return Frame{}, fmt.Errorf("%w: unknown dtype %d at offset 4", ErrFrame, b[4])
	}
	rows := binary.LittleEndian.Uint32(b[8:])
	cols := binary.LittleEndian.Uint32(b[12:])
	n := uint64(rows) * uint64(cols)
	if n > MaxFrameValues {
		return Frame{}, fmt.Errorf("%w: %d×%d values exceed the limit of %d", ErrFrame, rows, cols, MaxFrameValues)
	}
	if uint64(len(b)-FrameHeaderSize) != 4*n {
		return Frame{}, fmt.Errorf("%w: header says %d×%d values (%d bytes) but %d bytes follow", ErrFrame, rows, cols, 4*n, len(b)-FrameHeaderSize)
	}
	return Frame{DType: dt, Rows: int(rows), Cols: int(cols), Data: b[FrameHeaderSize:]}, nil
}

// F32 copies the frame's values into dst (grown as needed) and returns it.
func (f Frame) F32(dst []float32) ([]float32, error) {
	if f.DType != F32 {
		return nil, fmt.Errorf("%w: want f32 values, have dtype %d", ErrFrame, f.DType)
	}
	n := f.Rows * f.Cols
	if cap(dst) < n {
		dst = make([]float32, n)
	}
	dst = dst[:n]
	if n > 0 {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&dst[0])), 4*n), f.Data)
	}
	for i, x := range dst {
		if math.IsNaN(float64(x)) || math.IsInf(float64(x), 0) {
			return nil, fmt.Errorf("%w: value %d is not finite", ErrFrame, i)
		}
	}
	return dst, nil
}

// I32 copies the frame's values into dst (grown as needed) and returns it.
func (f Frame) I32(dst []int32) ([]int32, error) {
	if f.DType != I32 {
		return nil, fmt.Errorf("%w: want i32 values, have dtype %d", ErrFrame, f.DType)
	}
	n := f.Rows * f.Cols
	if cap(dst) < n {
		dst = make([]int32, n)
	}
	dst = dst[:n]
	if n > 0 {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&dst[0])), 4*n), f.Data)
	}
	return dst, nil
}
