package compute

import (
	"math"
	"testing"

	"github.com/tessera-grid/tessera/pkg/model"
	"github.com/tessera-grid/tessera/pkg/testmodel"
)

// stageFromFragments cuts ck into fragments of dtype and builds one stage
// of all of them.
func stageFromFragments(ck *model.Checkpoint, dtype string, pool *Pool) (*Stage, error) {
	blobs, _, err := model.Fragments("bench", ck, nil, model.FragmentOptions{DType: dtype})
	if err != nil {
		return nil, err
	}
	c := ck.Config
	var emb *Embedding
	var head *Head
	layers := make([]*Layer, c.Layers)
	for _, bl := range blobs {
		f, err := model.DecodeFragment(bl.Ref.ID, bl.Data)
		if err != nil {
			return nil, err
		}
		switch bl.Ref.Kind {
		case model.KindEmbed:
			emb, err = EmbeddingFromFragment(c, f)
		case model.KindHead:
			head, err = HeadFromFragment(c, f)
		case model.KindLayer:
			layers[bl.Ref.Layer], err = LayerFromFragment(c, f)
		}
		if err != nil {
			return nil, err
		}
	}
	return NewStage(c, 0, c.Layers, emb, layers, head, pool)
}

// Quantized fragments of the demo model stay close to float32: fed the
// reference tokens, their logits stay within a bound of float32's and
// their greedy choices agree; generating freely, they reproduce the
// reference for a long prefix. (Measured: f16 differs by at most 0.011
// and q8_0 by 0.38 in logits, and both reproduce all 60 tokens.)
func TestQuantizedModelsStayClose(t *testing.T) {
	ck, _ := loadDemo(t)
	for _, tc := range []struct {
		dtype     string
		maxErr    float64
		minAgree  int
		minPrefix int
	}{
		{model.DTypeF16, 0.05, 60, 60},
		{model.DTypeQ8_0, 1.0, 55, 30},
	} {
		t.Run(tc.dtype, func(t *testing.T) {
			st, err := stageFromFragments(ck, tc.dtype, NewPool(0))
			if err != nil {
				t.Fatal(err)
			}
			wantQ := map[string]DType{model.DTypeF16: F16, model.DTypeQ8_0: Q8_0}[tc.dtype]
			if l := st.Layers[0]; l.Wq.DType != wantQ || st.Head.Classifier.DType != wantQ || st.Embed.Table.DType != wantQ {
				t.Fatalf("matrices stored as %v, %v, %v; want %v", l.Wq.DType, st.Head.Classifier.DType, st.Embed.Table.DType, wantQ)
			}
			if tc.dtype == model.DTypeQ8_0 && st.Layers[0].W2.DType != F16 {
				// w2's rows (hidden 172) are not whole q8_0 blocks.
				t.Fatalf("w2 stored as %v, want f16", st.Layers[0].W2.DType)
			}
			ref := newPipeline(t, ck)
			p := &pipeline{stages: []*Stage{st}, caches: []*Cache{NewCache(ck.Config, ck.Config.Layers)}}
			lq, lf := p.step(t, 0, testmodel.PromptIDs), ref.step(t, 0, testmodel.PromptIDs)
			pos, agree, maxErr := len(testmodel.PromptIDs), 0, 0.0
			for _, want := range testmodel.GreedyIDs {
				if Argmax(lq) == want {
					agree++
				}
				for j := range lq {
					maxErr = math.Max(maxErr, math.Abs(float64(lq[j]-lf[j])))
				}
				lq, lf = p.step(t, pos, []int{want}), ref.step(t, pos, []int{want})
				pos++
			}
			if agree < tc.minAgree || maxErr > tc.maxErr {
				t.Fatalf("teacher-forced: %d/60 greedy tokens agree (want >= %d), logits differ by up to %.4f (want <= %v)", agree, tc.minAgree, maxErr, tc.maxErr)
			}
			p.caches[0].Reset()
			l := p.step(t, 0, testmodel.PromptIDs)
			pos, prefix := len(testmodel.PromptIDs), 0
			for _, want := range testmodel.GreedyIDs {
				if g := Argmax(l); g != want {
					break
				}
				prefix++
				l = p.step(t, pos, []int{want})
				pos++
			}
			if prefix < tc.minPrefix {
				t.Fatalf("free-running greedy output matches the reference for %d tokens, want >= %d", prefix, tc.minPrefix)
			}
		})
	}
}
