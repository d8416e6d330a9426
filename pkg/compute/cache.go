package compute

import "github.com/tessera-grid/tessera/pkg/wire"

// Cache holds one request's keys and values for a stage's layers. Within a
// layer, each key/value head's positions are contiguous
// ([head][position][head size]), so that attention for one head reads its
// keys and values front to back. It grows with the sequence instead of
// reserving the whole context up front.
type Cache struct {
	kvHeads int
	hs      int
	maxSeq  int
	capPos  int // positions each head has room for
	n       int
	k, v    [][]float32
}

// NewCache returns an empty cache for layers of a model with config c.
func NewCache(c wire.ModelConfig, layers int) *Cache {
	return &Cache{kvHeads: c.KVHeads, hs: HeadSize(c), maxSeq: c.SeqLen, k: make([][]float32, layers), v: make([][]float32, layers)}
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
	if n <= c.capPos {
		return
	}
	size := min(max(n, 2*c.capPos, 16), c.maxSeq)
	per := c.kvHeads * c.hs
	for i := range c.k {
		nk := make([]float32, size*per)
		nv := make([]float32, size*per)
		for h := 0; h < c.kvHeads && c.n > 0; h++ {
			copy(nk[h*size*c.hs:], c.k[i][h*c.capPos*c.hs:(h*c.capPos+c.n)*c.hs])
			copy(nv[h*size*c.hs:], c.v[i][h*c.capPos*c.hs:(h*c.capPos+c.n)*c.hs])
		}
		c.k[i], c.v[i] = nk, nv
	}
	c.capPos = size
}

// head returns layer l's keys and values of KV head h for positions [0, n).
func (c *Cache) head(l, h, n int) (k, v []float32) {
	off := h * c.capPos * c.hs
	return c.k[l][off : off+n*c.hs], c.v[l][off : off+n*c.hs]
}

// put stores one position's keys and values (kvHeads × hs each) in layer l.
func (c *Cache) put(l, pos int, k, v []float32) {
	for h := 0; h < c.kvHeads; h++ {
		off := (h*c.capPos + pos) * c.hs
		copy(c.k[l][off:off+c.hs], k[h*c.hs:(h+1)*c.hs])
		copy(c.v[l][off:off+c.hs], v[h*c.hs:(h+1)*c.hs])
	}
}
