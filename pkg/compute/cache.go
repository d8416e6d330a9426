package compute

import "github.com/tessera-grid/tessera/pkg/wire"

// Cache holds one request's keys and values for a stage's layers, each
// layer's positions contiguous so attention reads them in order. It grows
// with the sequence instead of reserving the whole context up front.
type Cache struct {
	kvDim  int
	maxSeq int
	n      int
	k, v   [][]float32
}

// NewCache returns an empty cache for layers of a model with config c.
func NewCache(c wire.ModelConfig, layers int) *Cache {
	return &Cache{kvDim: KVDim(c), maxSeq: c.SeqLen, k: make([][]float32, layers), v: make([][]float32, layers)}
}

// Len is the number of positions the cache holds.
func (c *Cache) Len() int { return c.n }

// Bytes is the memory the cache holds.
func (c *Cache) Bytes() int64 {
	var b int64
	for i := range c.k {
		b += 4 * int64(cap(c.k[i])+cap(c.v[i]))
	}
	return b
}

// Reset empties the cache, keeping its memory for reuse.
func (c *Cache) Reset() { c.n = 0 }

func (c *Cache) truncate(pos int) {
	if pos < c.n {
		c.n = pos
	}
}

// reserve makes room for n positions, doubling capacity to amortise growth.
func (c *Cache) reserve(n int) {
	need := n * c.kvDim
	for i := range c.k {
		if cap(c.k[i]) >= need {
			c.k[i] = c.k[i][:need]
			c.v[i] = c.v[i][:need]
			continue
		}
		size := max(need, 2*cap(c.k[i]), 16*c.kvDim)
		size = min(size, c.maxSeq*c.kvDim)
		nk := make([]float32, need, size)
		nv := make([]float32, need, size)
		copy(nk, c.k[i][:c.n*c.kvDim])
		copy(nv, c.v[i][:c.n*c.kvDim])
		c.k[i], c.v[i] = nk, nv
	}
}
