package model

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/tessera-grid/tessera/pkg/wire"
)

// Fragment kinds and ids. A model is cut into the embedding, one fragment
// per layer (attention and feed-forward weights), and the head.
const (
	KindEmbed  = "embed"
	KindLayer  = "layer"
	KindHead   = "head"
	KindExpert = "expert"

	FragEmbed = "embed"
	FragHead  = "head"
)

// LayerFragment is the id of layer i's fragment.
func LayerFragment(i int) string { return "layer." + strconv.Itoa(i) }

// ExpertFragment is the id of expert (or neuron group) e of layer i.
func ExpertFragment(i, e int) string { return LayerFragment(i) + ".expert." + strconv.Itoa(e) }

// ParseExpertID returns the layer and expert of an expert fragment id
// ("layer.<i>.expert.<e>").
func ParseExpertID(id string) (layer, expert int, err error) {
	rest, ok := strings.CutPrefix(id, "layer.")
	l, e, ok2 := strings.Cut(rest, ".expert.")
	if !ok || !ok2 {
		return 0, 0, fmt.Errorf("fragment id %q: want layer.<i>.expert.<e>", id)
	}
	layer, err1 := strconv.Atoi(l)
	expert, err2 := strconv.Atoi(e)
	if err1 != nil || err2 != nil || layer < 0 || expert < 0 {
		return 0, 0, fmt.Errorf("fragment id %q: bad layer or expert index", id)
	}
	return layer, expert, nil
}

// ParseFragmentID returns the kind and layer of a fragment id.
func ParseFragmentID(id string) (kind string, layer int, err error) {
	if strings.Contains(id, ".expert.") {
		layer, _, err := ParseExpertID(id)
		if err != nil {
			return "", 0, err
		}
		return KindExpert, layer, nil
	}
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
	expert := -1
	if kind == KindExpert {
		_, expert, _ = ParseExpertID(id)
	}
	m := wire.FragmentManifest{Model: model, Fragment: id, Kind: kind, Layer: layer, Expert: expert, DType: dtype}
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
	// Grouping, when set, splits each dense FFN into neuron groups for
	// selective activation, one fragment per group.
	Grouping *FFNGrouping
}

// FFNGrouping is how a dense model's feed-forward neurons are split into
// groups, with the predictor that chooses each token's groups.
type FFNGrouping struct {
	// TopK is how many groups a token activates per layer.
	TopK int
	// Neurons lists, per layer and group, the group's hidden neurons (every
	// neuron in exactly one group).
	Neurons [][][]int
	// Scorer is, per layer, the groups × dim predictor: a token's score
	// for group g is Scorer_g · x with x the FFN-normalized hidden state.
	Scorer [][]float32
	// Bias is, per layer, the scorer's per-group constant (groups values).
	Bias [][]float32
	// Comp is, per layer, the compensation for each chosen set of groups
	// (indexed by the set's bits, 1<<groups entries; nil: none).
	Comp [][]*FFNComp
	// Down is, per layer and per number k of active groups (index k, k <
	// groups; nil: none), the down projection refitted for tokens that
	// compute only k groups: dim × hidden, laid out as the dense W2, of
	// which each group uses its own neurons' columns in place of W2's.
	Down [][][]float32
	// Gate and Up are, per layer and per number k of active groups (as
	// Down), the gate and up projections fine-tuned for tokens that
	// compute only k groups: hidden × dim, laid out as the dense W1 and
	// W3, of which each group uses its own neurons' rows (nil: the dense
	// W1 and W3).
	Gate, Up [][][]float32
}

// DownTensor is the name, in a neuron group's fragment, of its down
// projection refitted for k active groups.
func DownTensor(k int) string { return fmt.Sprintf("w2.k%d", k) }

// GateTensor is the name, in a neuron group's fragment, of its gate
// projection fine-tuned for k active groups.
func GateTensor(k int) string { return fmt.Sprintf("w1.k%d", k) }

// UpTensor is the name, in a neuron group's fragment, of its up
// projection fine-tuned for k active groups.
func UpTensor(k int) string { return fmt.Sprintf("w3.k%d", k) }

// NeuronRows returns the rows ns, in that order, of the h × cols matrix w
// (row-major): len(ns) × cols values.
func NeuronRows(w []float32, cols int, ns []int) []float32 {
	out := make([]float32, 0, len(ns)*cols)
	for _, n := range ns {
		out = append(out, w[n*cols:(n+1)*cols]...)
	}
	return out
}

// NeuronColumns returns the columns ns, in that order, of the rows × h
// matrix w (row-major): rows × len(ns) values.
func NeuronColumns(w []float32, rows, h int, ns []int) []float32 {
	out := make([]float32, rows*len(ns))
	for j, n := range ns {
		for r := 0; r < rows; r++ {
			out[r*len(ns)+j] = w[r*h+n]
		}
	}
	return out
}

// FFNComp is the compensation of a split dense layer for one chosen set of
// neuron groups: the output the groups not chosen would have added,
// reconstructed from the FFN's normalized input x as U·(V·x) + B, a rank-R
// linear map fitted on calibration text.
type FFNComp struct {
	// R is the rank of the map.
	R int
	// U is dim × R, V is R × dim, B is dim values.
	U, V, B []float32
}

// FLOPs is the floating-point operations of applying c to one row.
func (c *FFNComp) FLOPs(dim int) int { return 2 * (2*c.R*dim + dim) }

// Check verifies c's shapes for a model of width dim.
func (c *FFNComp) Check(dim int) error {
	if c.R < 0 || len(c.U) != dim*c.R || len(c.V) != c.R*dim || len(c.B) != dim {
		return fmt.Errorf("compensation: rank %d with %d, %d and %d values for dim %d", c.R, len(c.U), len(c.V), len(c.B), dim)
	}
	return nil
}

// Groups is the number of groups per layer.
func (g *FFNGrouping) Groups() int {
	if len(g.Neurons) == 0 {
		return 0
	}
	return len(g.Neurons[0])
}

// check verifies the grouping fits config c.
func (g *FFNGrouping) check(c wire.ModelConfig) error {
	n := g.Groups()
	if n < 2 || len(g.Neurons) != c.Layers || len(g.Scorer) != c.Layers || len(g.Bias) != c.Layers || g.TopK < 1 || g.TopK > n {
		return fmt.Errorf("grouping: %d layers of %d groups with top_k %d does not fit %d layers", len(g.Neurons), n, g.TopK, c.Layers)
	}
	if (g.Gate == nil) != (g.Up == nil) {
		return fmt.Errorf("grouping: fine-tuned gate projections without up projections, or up without gate")
	}
	for l := range g.Neurons {
		seen := make([]bool, c.HiddenDim)
		if g.Comp != nil {
			if len(g.Comp) != c.Layers || len(g.Comp[l]) != 1<<n {
				return fmt.Errorf("grouping: layer %d compensation has the wrong number of sets", l)
			}
			for _, cp := range g.Comp[l] {
				if cp != nil {
					if err := cp.Check(c.Dim); err != nil {
						return fmt.Errorf("grouping: layer %d: %w", l, err)
					}
				}
			}
		}
		if g.Down != nil {
			if len(g.Down) != c.Layers || len(g.Down[l]) != n {
				return fmt.Errorf("grouping: layer %d has refitted down projections for %d group counts, want %d", l, len(g.Down[l]), n)
			}
			for k, w := range g.Down[l] {
				if w != nil && (k == 0 || len(w) != c.Dim*c.HiddenDim) {
					return fmt.Errorf("grouping: layer %d down projection for %d groups has %d values, want %d×%d", l, k, len(w), c.Dim, c.HiddenDim)
				}
			}
		}
		for _, p := range []struct {
			name string
			ws   [][][]float32
		}{{"gate", g.Gate}, {"up", g.Up}} {
			if p.ws == nil {
				continue
			}
			if len(p.ws) != c.Layers {
				return fmt.Errorf("grouping: fine-tuned %s projections for %d layers, want %d", p.name, len(p.ws), c.Layers)
			}
			if len(p.ws[l]) != n {
				return fmt.Errorf("grouping: layer %d has fine-tuned %s projections for %d group counts, want %d", l, p.name, len(p.ws[l]), n)
			}
			for k, w := range p.ws[l] {
				if w != nil && (k == 0 || len(w) != c.HiddenDim*c.Dim) {
					return fmt.Errorf("grouping: layer %d %s projection for %d groups has %d values, want %d×%d", l, p.name, k, len(w), c.HiddenDim, c.Dim)
				}
			}
		}
		if g.Gate != nil {
			for k := range g.Gate[l] {
				if (g.Gate[l][k] == nil) != (g.Up[l][k] == nil) {
					return fmt.Errorf("grouping: layer %d has a fine-tuned up projection for %d groups without its gate projection, or a gate without up", l, k)
				}
			}
		}
		if len(g.Neurons[l]) != n || len(g.Scorer[l]) != n*c.Dim || len(g.Bias[l]) != n {
			return fmt.Errorf("grouping: layer %d has %d groups and %d scorer values, want %d and %d", l, len(g.Neurons[l]), len(g.Scorer[l]), n, n*c.Dim)
		}
		for gi, ns := range g.Neurons[l] {
			for _, x := range ns {
				if x < 0 || x >= c.HiddenDim || seen[x] {
					return fmt.Errorf("grouping: layer %d group %d: neuron %d outside 0..%d or in two groups", l, gi, x, c.HiddenDim-1)
				}
				seen[x] = true
			}
		}
		for x, ok := range seen {
			if !ok {
				return fmt.Errorf("grouping: layer %d: neuron %d in no group", l, x)
			}
		}
	}
	return nil
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
		expert := -1
		if kind == KindExpert {
			_, expert, _ = ParseExpertID(fid)
		}
		blobs = append(blobs, Blob{Ref: wire.FragmentRef{ID: fid, Kind: kind, Layer: layer, Expert: expert, Object: ObjectName(sha), SHA256: sha, Bytes: int64(len(b))}, Data: b})
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
	grp := opts.Grouping
	if grp != nil {
		if c.Experts > 0 {
			return nil, wire.ModelManifest{}, fmt.Errorf("fragments: a mixture-of-experts model cannot be grouped")
		}
		if err := grp.check(c); err != nil {
			return nil, wire.ModelManifest{}, err
		}
		c.FFNGroups, c.TopK = grp.Groups(), grp.TopK
	}
	layout := &wire.ExpertLayout{Groups: 1, TopK: 1}
	for i := 0; i < c.Layers; i++ {
		ts := []Tensor{
			vec("attn_norm", ck.AttnNorm[i]), mat("wq", d, d, ck.Wq[i]), mat("wk", kv, d, ck.Wk[i]), mat("wv", kv, d, ck.Wv[i]), mat("wo", d, d, ck.Wo[i]),
			vec("ffn_norm", ck.FFNNorm[i]),
		}
		// groups are the layer's expert fragments: a mixture's experts, a
		// dense FFN's neuron groups, or none (the FFN stays in the layer).
		var groups [][]Tensor
		switch {
		case c.Experts > 0:
			ts = append(ts, mat("gate", c.Experts, d, ck.Gate[i]))
			n := f * d
			for e := 0; e < c.Experts; e++ {
				groups = append(groups, []Tensor{mat("w1", f, d, ck.W1[i][e*n:(e+1)*n]), mat("w2", d, f, ck.W2[i][e*n:(e+1)*n]), mat("w3", f, d, ck.W3[i][e*n:(e+1)*n])})
			}
			layout.Groups, layout.TopK, layout.Native = c.Experts, c.TopK, true
		case grp != nil:
			ts = append(ts, vec("scorer", grp.Scorer[i]))
			ts[len(ts)-1].Shape = []int{grp.Groups(), d}
			ts = append(ts, vec("scorer_bias", grp.Bias[i]))
			if grp.Comp != nil {
				for m, cp := range grp.Comp[i] {
					if cp == nil || bits.OnesCount(uint(m)) != grp.TopK {
						continue // a set of another size is never chosen
					}
					// comp.<set>.{u,v,b}: the compensation for chosen set m.
					ts = append(ts, Tensor{Name: fmt.Sprintf("comp.%d.u", m), Shape: []int{d, cp.R}, Values: cp.U, DType: DTypeF32},
						Tensor{Name: fmt.Sprintf("comp.%d.v", m), Shape: []int{cp.R, d}, Values: cp.V, DType: DTypeF32},
						vec(fmt.Sprintf("comp.%d.b", m), cp.B))
				}
			}
			for _, ns := range grp.Neurons[i] {
				gt := neuronGroup(ck, i, ns, mat)
				if k := grp.TopK; grp.Down != nil && k < grp.Groups() && grp.Down[i][k] != nil {
					gt = append(gt, mat(DownTensor(k), d, len(ns), NeuronColumns(grp.Down[i][k], d, f, ns)))
				}
				if k := grp.TopK; grp.Gate != nil && k < grp.Groups() && grp.Gate[i][k] != nil {
					// The check has made sure the up projection is there too.
					gt = append(gt, mat(GateTensor(k), len(ns), d, NeuronRows(grp.Gate[i][k], d, ns)),
						mat(UpTensor(k), len(ns), d, NeuronRows(grp.Up[i][k], d, ns)))
				}
				groups = append(groups, gt)
			}
			layout.Groups, layout.TopK = grp.Groups(), grp.TopK
		default:
			ts = append(ts, mat("w1", f, d, ck.W1[i]), mat("w2", d, f, ck.W2[i]), mat("w3", f, d, ck.W3[i]))
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
			for _, g := range groups[:min(1, len(groups))] {
				for _, t := range g {
					n, _ := tensorBytes(t.DType, int64(len(t.Values)))
					ffnBytes += n
				}
			}
		}
		if err := add(LayerFragment(i), KindLayer, i, ts); err != nil {
			return nil, wire.ModelManifest{}, err
		}
		for e, g := range groups {
			if err := add(ExpertFragment(i, e), KindExpert, i, g); err != nil {
				return nil, wire.ModelManifest{}, err
			}
		}
	}
	layout.GroupBytes, layout.SharedBytes = ffnBytes, attnBytes
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
		// a native mixture of experts or a grouping has more.
		ExpertLayout: layout,
		Created:      time.Now().UTC(),
	}
	m.LayerBytes = make([]int64, c.Layers)
	for _, b := range blobs {
		m.Fragments = append(m.Fragments, b.Ref)
		m.TotalBytes += b.Ref.Bytes
		if b.Ref.Kind == KindLayer || b.Ref.Kind == KindExpert {
			m.LayerBytes[b.Ref.Layer] += b.Ref.Bytes
		}
	}
	m.LayerWeightBytes = m.LayerBytes[0]
	return blobs, m, nil
}

// neuronGroup returns the w1, w2 and w3 of neurons ns of layer i of a
// dense ck (rows of w1 and w3, columns of w2), and the neuron indices.
func neuronGroup(ck *Checkpoint, i int, ns []int, mat func(string, int, int, []float32) Tensor) []Tensor {
	d, f := ck.Config.Dim, ck.Config.HiddenDim
	idx := make([]float32, len(ns))
	for j, n := range ns {
		idx[j] = float32(n)
	}
	return []Tensor{mat("w1", len(ns), d, NeuronRows(ck.W1[i], d, ns)), mat("w2", d, len(ns), NeuronColumns(ck.W2[i], d, f, ns)), mat("w3", len(ns), d, NeuronRows(ck.W3[i], d, ns)),
		{Name: "neurons", Shape: []int{len(ns)}, Values: idx, DType: DTypeF32}}
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
	if c.Experts > 0 {
		perLayer = 2 * (2*d*d + 2*kv*d + int64(c.Experts)*d + 3*int64(c.TopK)*f*d)
	}
	return L*perLayer + 2*int64(c.Vocab)*d
}
