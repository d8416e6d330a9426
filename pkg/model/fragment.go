package model

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Fragment kinds and ids. A model is cut into the embedding, one fragment
// per layer (attention and feed-forward weights), and the head.
const (
	KindEmbed = "embed"
	KindLayer = "layer"
	KindHead  = "head"

	FragEmbed = "embed"
	FragHead  = "head"
)

// LayerFragment is the id of layer i's fragment.
func LayerFragment(i int) string { return "layer." + strconv.Itoa(i) }

// ParseFragmentID returns the kind and layer of a fragment id.
func ParseFragmentID(id string) (kind string, layer int, err error) {
	switch id {
	case FragEmbed:
		return KindEmbed, -1, nil
	case FragHead:
		return KindHead, -1, nil
	}
	rest, ok := strings.CutPrefix(id, "layer.")
	if !ok {
		return "", 0, fmt.Errorf("fragment id %q: want embed, head or layer.<i>", id)
	}
	n, err := strconv.Atoi(rest)
	if err != nil || n < 0 {
		return "", 0, fmt.Errorf("fragment id %q: bad layer index", id)
	}
	return KindLayer, n, nil
}

// A fragment blob is:
//
//	0  magic "TSFG"
//	4  uint32 length M of the manifest JSON
//	8  manifest JSON (wire.FragmentManifest with SHA256 and Bytes empty)
//	   zero padding to a multiple of 64
//	   tensor data; manifest offsets count from here
//
// The blob's sha256 is its content address: the object store name is
// "sha256/<hex>", and executors verify it before loading.
const (
	fragMagic = "TSFG"
	fragAlign = 64
)

// Fragment is a decoded fragment blob.
type Fragment struct {
	Manifest wire.FragmentManifest
	// Data is the tensor data region.
	Data []byte
}

// ObjectName is the object store name of a blob with digest sha (hex).
func ObjectName(sha string) string { return "sha256/" + sha }

// Digest returns the hex sha256 of b.
func Digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Tensor is one named tensor to store in a fragment.
type Tensor struct {
	Name   string
	Shape  []int
	Values []float32
	// DType is the storage type (DTypeF32 when empty).
	DType string
}

// EncodeFragment builds a blob holding the named tensors (f32), in order.
func EncodeFragment(model, id string, names []string, shapes [][]int, values [][]float32) ([]byte, error) {
	ts := make([]Tensor, len(names))
	for i := range names {
		ts[i] = Tensor{Name: names[i], Shape: shapes[i], Values: values[i]}
	}
	return EncodeTensors(model, id, "", ts)
}

// EncodeTensors builds a blob holding tensors in order, each stored in its
// dtype; dtype is the fragment's nominal storage type for its manifest
// (the first tensor's when empty).
func EncodeTensors(model, id, dtype string, tensors []Tensor) ([]byte, error) {
	kind, layer, err := ParseFragmentID(id)
	if err != nil {
		return nil, err
	}
	if dtype == "" {
		dtype = DTypeF32
		if len(tensors) > 0 && tensors[0].DType != "" {
			dtype = tensors[0].DType
		}
	}
	m := wire.FragmentManifest{Model: model, Fragment: id, Kind: kind, Layer: layer, Expert: -1, DType: dtype}
	var off int64
	for i := range tensors {
		t := &tensors[i]
		if t.DType == "" {
			t.DType = DTypeF32
		}
		count := 1
		for _, d := range t.Shape {
			count *= d
		}
		if count != len(t.Values) {
			return nil, fmt.Errorf("fragment %s tensor %s: shape %v has %d values, given %d", id, t.Name, t.Shape, count, len(t.Values))
		}
		if t.DType == DTypeQ8_0 && (len(t.Shape) == 0 || t.Shape[len(t.Shape)-1]%Q8Block != 0) {
			return nil, fmt.Errorf("fragment %s tensor %s: q8_0 rows need a multiple of %d values, shape is %v", id, t.Name, Q8Block, t.Shape)
		}
		n, err := tensorBytes(t.DType, int64(count))
		if err != nil {
			return nil, fmt.Errorf("fragment %s tensor %s: %w", id, t.Name, err)
		}
		m.Tensors = append(m.Tensors, wire.TensorInfo{Name: t.Name, Shape: t.Shape, DType: t.DType, Offset: off, Bytes: n})
		off += n
		off = (off + fragAlign - 1) / fragAlign * fragAlign
	}
	mj, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	head := 8 + len(mj)
	head = (head + fragAlign - 1) / fragAlign * fragAlign
	out := make([]byte, head+int(off))
	copy(out, fragMagic)
	binary.LittleEndian.PutUint32(out[4:], uint32(len(mj)))
	copy(out[8:], mj)
	for i, t := range m.Tensors {
		dst := out[head+int(t.Offset) : head+int(t.Offset+t.Bytes)]
		vals := tensors[i].Values
		switch t.DType {
		case DTypeF32:
			for j, v := range vals {
				binary.LittleEndian.PutUint32(dst[4*j:], math.Float32bits(v))
			}
		case DTypeF16:
			AppendF16(dst[:0], vals)
		case DTypeQ8_0:
			if _, err := AppendQ8_0(dst[:0], vals); err != nil {
				return nil, fmt.Errorf("fragment %s tensor %s: %w", id, t.Name, err)
			}
		}
	}
	return out, nil
}

// maxManifest bounds the manifest length a blob may declare.
const maxManifest = 1 << 20

// DecodeFragment parses a fragment blob, checking every tensor lies inside
// the data region. name is used in errors, which give byte offsets.
func DecodeFragment(name string, b []byte) (*Fragment, error) {
	if len(b) < 8 || string(b[:4]) != fragMagic {
		return nil, fmt.Errorf("fragment %s: not a fragment blob (bad magic at offset 0)", name)
	}
	ml := int(binary.LittleEndian.Uint32(b[4:]))
	if ml > maxManifest || 8+ml > len(b) {
		return nil, fmt.Errorf("fragment %s: manifest of %d bytes at offset 8 exceeds the blob's %d bytes", name, ml, len(b))
	}
	f := &Fragment{}
	if err := wire.Decode(b[8:8+ml], &f.Manifest); err != nil {
		return nil, fmt.Errorf("fragment %s: manifest at offset 8: %w", name, err)
	}
	head := (8 + ml + fragAlign - 1) / fragAlign * fragAlign
	if head > len(b) {
		return nil, fmt.Errorf("fragment %s: truncated: data would start at offset %d, blob has %d bytes", name, head, len(b))
	}
	f.Data = b[head:]
	for _, t := range f.Manifest.Tensors {
		count := int64(1)
		for _, d := range t.Shape {
			if d < 0 || d > maxDim {
				return nil, fmt.Errorf("fragment %s: tensor %s has bad shape %v", name, t.Name, t.Shape)
			}
			count *= int64(d)
			if count > int64(len(b)) {
				// More values than the blob has bytes: cannot fit (and
				// stops the product from overflowing).
				return nil, fmt.Errorf("fragment %s: truncated: tensor %s of shape %v cannot fit in %d bytes", name, t.Name, t.Shape, len(b))
			}
		}
		want, err := tensorBytes(t.DType, count)
		if err != nil {
			return nil, fmt.Errorf("fragment %s: tensor %s: %w", name, t.Name, err)
		}
		if t.Bytes != want {
			return nil, fmt.Errorf("fragment %s: tensor %s: %d bytes declared, shape %v of %s needs %d", name, t.Name, t.Bytes, t.Shape, t.DType, want)
		}
		if t.Offset < 0 || t.Offset+t.Bytes > int64(len(f.Data)) {
			return nil, fmt.Errorf("fragment %s: truncated: tensor %s spans offsets %d..%d, data ends at %d", name, t.Name, int64(head)+t.Offset, int64(head)+t.Offset+t.Bytes, len(b))
		}
	}
	return f, nil
}

// tensorBytes is the storage size of count values of dtype.
func tensorBytes(dtype string, count int64) (int64, error) {
	switch dtype {
	case "f32":
		return 4 * count, nil
	case "f16":
		return 2 * count, nil
	case "q8_0":
		if count%32 != 0 {
			return 0, fmt.Errorf("q8_0 needs a multiple of 32 values, have %d", count)
		}
		return count / 32 * 34, nil
	}
	return 0, fmt.Errorf("unknown dtype %q", dtype)
}

// Tensor returns the info and raw bytes of the named tensor.
func (f *Fragment) Tensor(name string) (wire.TensorInfo, []byte, error) {
	for _, t := range f.Manifest.Tensors {
		if t.Name == name {
			return t, f.Data[t.Offset : t.Offset+t.Bytes], nil
		}
	}
	return wire.TensorInfo{}, nil, fmt.Errorf("fragment %s/%s has no tensor %q", f.Manifest.Model, f.Manifest.Fragment, name)
}

// F32 returns the named f32 tensor, checking its shape. On little-endian
// machines the values alias the blob (aligned to 64 bytes), with no copy.
func (f *Fragment) F32(name string, shape ...int) ([]float32, error) {
	t, raw, err := f.Tensor(name)
	if err != nil {
		return nil, err
	}
	if t.DType != "f32" {
		return nil, fmt.Errorf("fragment %s tensor %s is %s, want f32", f.Manifest.Fragment, name, t.DType)
	}
	if len(shape) != len(t.Shape) {
		return nil, fmt.Errorf("fragment %s tensor %s has shape %v, want %v", f.Manifest.Fragment, name, t.Shape, shape)
	}
	for i := range shape {
		if shape[i] != t.Shape[i] {
			return nil, fmt.Errorf("fragment %s tensor %s has shape %v, want %v", f.Manifest.Fragment, name, t.Shape, shape)
		}
	}
	n := len(raw) / 4
	if n == 0 {
		return []float32{}, nil
	}
	if uintptr(unsafe.Pointer(&raw[0]))%4 == 0 {
		return unsafe.Slice((*float32)(unsafe.Pointer(&raw[0])), n), nil
	}
	out := make([]float32, n)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return out, nil
}

// Blob is one encoded fragment with its reference.
type Blob struct {
	Ref  wire.FragmentRef
	Data []byte
}

// FragmentOptions says how Fragments stores a model.
type FragmentOptions struct {
	// DType is the storage type of weight matrices (embedding, attention
	// and feed-forward projections, classifier): DTypeF32 (default),
	// DTypeF16 or DTypeQ8_0. Norm weights stay f32. A q8_0 matrix whose
	// rows are not a whole number of 32-value blocks is stored as f16.
	DType string
}

// matrixDType is the dtype a matrix with rows of cols values is stored in.
func (o FragmentOptions) matrixDType(cols int) string {
	if o.DType == DTypeQ8_0 && cols%Q8Block != 0 {
		return DTypeF16
	}
	return o.DType
}

// Fragments cuts ck into blobs (embed, one per layer, head) and returns them
// with the model's manifest; tokenizer is the tokenizer file's bytes.
func Fragments(id string, ck *Checkpoint, tokenizer []byte, opts FragmentOptions) ([]Blob, wire.ModelManifest, error) {
	switch opts.DType {
	case "":
		opts.DType = DTypeF32
	case DTypeF32, DTypeF16, DTypeQ8_0:
	default:
		return nil, wire.ModelManifest{}, fmt.Errorf("fragments: unknown dtype %q (want f32, f16 or q8_0)", opts.DType)
	}
	c := ck.Config
	d, kv, f := c.Dim, KVDim(c), c.HiddenDim
	var blobs []Blob
	add := func(fid, kind string, layer int, ts []Tensor) error {
		b, err := EncodeTensors(id, fid, opts.DType, ts)
		if err != nil {
			return err
		}
		sha := Digest(b)
		blobs = append(blobs, Blob{Ref: wire.FragmentRef{ID: fid, Kind: kind, Layer: layer, Expert: -1, Object: ObjectName(sha), SHA256: sha, Bytes: int64(len(b))}, Data: b})
		return nil
	}
	vec := func(name string, v []float32) Tensor {
		return Tensor{Name: name, Shape: []int{len(v)}, Values: v, DType: DTypeF32}
	}
	mat := func(name string, rows, cols int, v []float32) Tensor {
		return Tensor{Name: name, Shape: []int{rows, cols}, Values: v, DType: opts.matrixDType(cols)}
	}
	var attnBytes, ffnBytes int64
	if err := add(FragEmbed, KindEmbed, -1, []Tensor{mat("token_embedding", c.Vocab, d, ck.TokenEmbedding)}); err != nil {
		return nil, wire.ModelManifest{}, err
	}
	for i := 0; i < c.Layers; i++ {
		ts := []Tensor{
			vec("attn_norm", ck.AttnNorm[i]), mat("wq", d, d, ck.Wq[i]), mat("wk", kv, d, ck.Wk[i]), mat("wv", kv, d, ck.Wv[i]), mat("wo", d, d, ck.Wo[i]),
			vec("ffn_norm", ck.FFNNorm[i]), mat("w1", f, d, ck.W1[i]), mat("w2", d, f, ck.W2[i]), mat("w3", f, d, ck.W3[i]),
		}
		if i == 0 {
			for _, t := range ts {
				n, _ := tensorBytes(t.DType, int64(len(t.Values)))
				switch t.Name {
				case "ffn_norm", "w1", "w2", "w3":
					ffnBytes += n
				default:
					attnBytes += n
				}
			}
		}
		if err := add(LayerFragment(i), KindLayer, i, ts); err != nil {
			return nil, wire.ModelManifest{}, err
		}
	}
	if err := add(FragHead, KindHead, -1, []Tensor{vec("norm", ck.FinalNorm), mat("classifier", c.Vocab, d, ck.Classifier)}); err != nil {
		return nil, wire.ModelManifest{}, err
	}
	tsha := Digest(tokenizer)
	m := wire.ModelManifest{
		ID: id, Family: "llama", Config: c, DType: opts.DType,
		TokenizerObject: ObjectName(tsha), TokenizerSHA256: tsha,
		KVBytesPerToken:      KVBytesPerTokenPerLayer(c),
		KVBytesPerTokenModel: KVBytesPerTokenPerLayer(c) * int64(c.Layers),
		FLOPsPerToken:        FLOPsPerToken(c),
		// A dense feed-forward network is one group that every token uses;
		// splitting it (or a native mixture of experts) fills in more.
		ExpertLayout: &wire.ExpertLayout{Groups: 1, TopK: 1, GroupBytes: ffnBytes, SharedBytes: attnBytes},
		Created:      time.Now().UTC(),
	}
	m.LayerBytes = make([]int64, c.Layers)
	for _, b := range blobs {
		m.Fragments = append(m.Fragments, b.Ref)
		m.TotalBytes += b.Ref.Bytes
		if b.Ref.Kind == KindLayer {
			m.LayerBytes[b.Ref.Layer] = b.Ref.Bytes
			if b.Ref.Layer == 0 {
				m.LayerWeightBytes = b.Ref.Bytes
			}
		}
	}
	return blobs, m, nil
}

// KVBytesPerTokenPerLayer is the key/value cache one token takes in one
// layer (float32 keys and values).
func KVBytesPerTokenPerLayer(c wire.ModelConfig) int64 { return 2 * 4 * int64(KVDim(c)) }

// FLOPsPerToken estimates the forward FLOPs of one token (2 per
// multiply-add of the weight matrices; attention over the context is left
// out as it depends on the position).
func FLOPsPerToken(c wire.ModelConfig) int64 {
	d, kv, f, L := int64(c.Dim), int64(KVDim(c)), int64(c.HiddenDim), int64(c.Layers)
	perLayer := 2 * (2*d*d + 2*kv*d + 3*f*d)
	return L*perLayer + 2*int64(c.Vocab)*d
}
