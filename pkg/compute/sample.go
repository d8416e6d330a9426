package compute

import (
	"math"
	"sort"
)

// Sampler picks the next token from logits the way llama2.c's run.c does:
// greedy at temperature 0; otherwise softmax(logits/temperature) and, with
// 0 < top_p < 1, nucleus sampling; randomness from a xorshift64* generator
// seeded once per request, so the same seed gives the same output.
type Sampler struct {
	Temperature float32
	TopP        float32
	state       uint64
	probs       []probIndex
}

type probIndex struct {
	p float32
	i int
}

// NewSampler returns a sampler; seed 0 is replaced by 1 (xorshift needs a
// non-zero state).
func NewSampler(temperature, topP float32, seed uint64) *Sampler {
	if seed == 0 {
		seed = 1
	}
	return &Sampler{Temperature: temperature, TopP: topP, state: seed}
}

func (s *Sampler) randomU32() uint32 {
	s.state ^= s.state >> 12
	s.state ^= s.state << 25
	s.state ^= s.state >> 27
	return uint32((s.state * 0x2545F4914F6CDD1D) >> 32)
}

func (s *Sampler) randomF32() float32 { return float32(s.randomU32()>>8) / 16777216.0 }

// Argmax returns the index of the largest value (the first on ties).
func Argmax(x []float32) int {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return best
}

// Sample picks a token from logits, which it may overwrite.
func (s *Sampler) Sample(logits []float32) int {
	if s.Temperature == 0 {
		return Argmax(logits)
	}
	for i := range logits {
		logits[i] /= s.Temperature
	}
	softmax(logits)
	coin := s.randomF32()
	if s.TopP <= 0 || s.TopP >= 1 {
		var cdf float32
		for i, p := range logits {
			cdf += p
			if coin < cdf {
				return i
			}
		}
		return len(logits) - 1
	}
	return s.sampleTopP(logits, coin)
}

func (s *Sampler) sampleTopP(probs []float32, coin float32) int {
	cutoff := (1 - s.TopP) / float32(len(probs)-1)
	s.probs = s.probs[:0]
	for i, p := range probs {
		if p >= cutoff {
			s.probs = append(s.probs, probIndex{p, i})
		}
	}
	sort.SliceStable(s.probs, func(a, b int) bool { return s.probs[a].p > s.probs[b].p })
	var cum float32
	last := len(s.probs) - 1
	for i, pi := range s.probs {
		cum += pi.p
		if cum > s.TopP {
			last = i
			break
		}
	}
	r := coin * cum
	var cdf float32
	for i := 0; i <= last; i++ {
		cdf += s.probs[i].p
		if r < cdf {
			return s.probs[i].i
		}
	}
	return s.probs[last].i
}

// LogSoftmax writes log-probabilities of logits into out (for evaluation).
func LogSoftmax(out, logits []float32) {
	m := logits[Argmax(logits)]
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v - m))
	}
	ls := float32(math.Log(sum))
	for i, v := range logits {
		out[i] = v - m - ls
	}
}
