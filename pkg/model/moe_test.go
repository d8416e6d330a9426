package model

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/pkg/wire"
)

var moeShape = wire.ModelConfig{Dim: 32, HiddenDim: 48, Layers: 2, Heads: 4, KVHeads: 2, Vocab: 300, SeqLen: 32, Experts: 4, TopK: 2}

func moeBytes(t testing.TB) []byte {
	t.Helper()
	ck, err := Synthesize(moeShape, 5)
	if err != nil {
		t.Fatal(err)
	}
	return ck.Encode()
}

// A synthetic mixture-of-experts model round-trips through its format.
func TestMoECheckpointRoundTrip(t *testing.T) {
	ck, err := Synthesize(moeShape, 5)
	if err != nil {
		t.Fatal(err)
	}
	b := ck.Encode()
	if string(b[:4]) != moeMagic || int64(len(b)) != moeHeaderSize+4*ParamCount(moeShape) {
		t.Fatalf("encoded %d bytes starting %q", len(b), b[:4])
	}
	back, err := ParseCheckpoint("moe.bin", b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, ck) {
		t.Fatal("decoded checkpoint differs from the encoded one")
	}
	if !bytes.Equal(back.Encode(), b) {
		t.Fatal("re-encoding changed the bytes")
	}
	if len(ck.Gate[1]) != moeShape.Experts*moeShape.Dim || len(ck.W2[1]) != moeShape.Experts*moeShape.Dim*moeShape.HiddenDim {
		t.Fatalf("gate %d and w2 %d values per layer", len(ck.Gate[1]), len(ck.W2[1]))
	}
}

func TestMoECheckpointErrorsNameFileAndOffset(t *testing.T) {
	b := moeBytes(t)
	with := func(off int, v int32) []byte {
		c := append([]byte{}, b...)
		binary.LittleEndian.PutUint32(c[off:], uint32(v))
		return c
	}
	cases := []struct {
		name string
		data []byte
		want string
	}{
		{"short header", b[:20], "offset 20"},
		{"version", with(4, 2), "version 2 at offset 4"},
		{"bad dim", with(8, -1), "header (offset 8): dim = -1"},
		{"no experts", with(36, 0), "n_experts = 0 at offset 36"},
		{"top_k above experts", with(40, 5), "top_k = 5 at offset 40"},
		{"truncated", b[:len(b)-4], "truncated: header describes"},
		{"trailing", append(append([]byte{}, b...), 1, 2), "2 unexpected trailing bytes at offset"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseCheckpoint("m.bin", tc.data)
			if err == nil || !strings.Contains(err.Error(), "m.bin") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error naming m.bin and %q", err, tc.want)
			}
		})
	}
}

func FuzzParseMoECheckpoint(f *testing.F) {
	b := moeBytes(f)
	// The target prepends the magic, so that inputs explore the rest.
	f.Add(b[4:moeHeaderSize])
	f.Add(b[4:])
	f.Fuzz(func(t *testing.T, data []byte) {
		ck, err := ParseCheckpoint("fuzz.bin", append([]byte(moeMagic), data...))
		if err != nil {
			return
		}
		c := ck.Config
		if ValidateConfig(c) != nil || c.Experts < 1 || c.TopK < 1 || c.TopK > c.Experts {
			t.Fatalf("accepted an invalid config %+v", c)
		}
		if len(ck.Gate) != c.Layers || len(ck.W1[0]) != c.Experts*c.HiddenDim*c.Dim {
			t.Fatal("decoded tensors do not match the header")
		}
	})
}
