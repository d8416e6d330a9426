package model

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"strings"
)

// Special token ids of llama2.c tokenizers.
const (
	TokenUnknown = 0
	TokenBOS     = 1
	TokenEOS     = 2
)

// Tokenizer is a llama2.c byte-pair tokenizer: a vocabulary of pieces with
// merge scores and byte-fallback tokens <0x00>..<0xFF>.
type Tokenizer struct {
	pieces    []string
	scores    []float32
	index     map[string]int
	byteToken [256]int // id of <0xXX>, or -1
	byteOf    []int16  // the byte a <0xXX> token stands for, or -1
	maxLen    int
}

// LoadTokenizer reads a llama2.c tokenizer file with vocab entries.
func LoadTokenizer(path string, vocab int) (*Tokenizer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	return ParseTokenizer(path, b, vocab)
}

// ParseTokenizer decodes a llama2.c tokenizer held in b: a uint32 maximum
// piece length, then vocab records of (float32 score, int32 length, bytes).
// Errors name the file and the byte offset.
func ParseTokenizer(name string, b []byte, vocab int) (*Tokenizer, error) {
	if vocab <= 0 || vocab > maxDim {
		return nil, fmt.Errorf("tokenizer %s: vocab size %d out of range", name, vocab)
	}
	if len(b) < 4 {
		return nil, fmt.Errorf("tokenizer %s: truncated at offset %d: no max_token_length", name, len(b))
	}
	t := &Tokenizer{
		pieces: make([]string, vocab),
		scores: make([]float32, vocab),
		index:  make(map[string]int, vocab),
		byteOf: make([]int16, vocab),
		maxLen: int(binary.LittleEndian.Uint32(b)),
	}
	for i := range t.byteToken {
		t.byteToken[i] = -1
	}
	off := 4
	for i := 0; i < vocab; i++ {
		if len(b)-off < 8 {
			return nil, fmt.Errorf("tokenizer %s: truncated at offset %d: record %d of %d", name, off, i, vocab)
		}
		score := math.Float32frombits(binary.LittleEndian.Uint32(b[off:]))
		n := int32(binary.LittleEndian.Uint32(b[off+4:]))
		if math.IsNaN(float64(score)) {
			return nil, fmt.Errorf("tokenizer %s: record %d at offset %d: score is NaN", name, i, off)
		}
		if n < 0 || int(n) > len(b)-off-8 {
			return nil, fmt.Errorf("tokenizer %s: record %d at offset %d: piece length %d exceeds the %d bytes left", name, i, off, n, len(b)-off-8)
		}
		p := string(b[off+8 : off+8+int(n)])
		off += 8 + int(n)
		t.pieces[i], t.scores[i] = p, score
		if _, dup := t.index[p]; !dup {
			t.index[p] = i
		}
		t.byteOf[i] = -1
		if v, ok := parseByteToken(p); ok {
			t.byteToken[v] = i
			t.byteOf[i] = int16(v)
		}
	}
	if off != len(b) {
		return nil, fmt.Errorf("tokenizer %s: %d unexpected trailing bytes at offset %d", name, len(b)-off, off)
	}
	return t, nil
}

// Vocab is the number of pieces.
func (t *Tokenizer) Vocab() int { return len(t.pieces) }

// Piece returns the text of token id as stored (byte tokens as "<0xXX>").
func (t *Tokenizer) Piece(id int) string { return t.pieces[id] }

// Encode turns text into token ids as llama2.c does: optional BOS, a dummy
// prefix space, UTF-8 code points (byte fallback for unknown ones), then
// greedy merges of the best-scoring adjacent pair; optional EOS.
func (t *Tokenizer) Encode(text string, bos, eos bool) []int {
	toks := make([]int, 0, len(text)+3)
	if bos {
		toks = append(toks, TokenBOS)
	}
	if text != "" {
		if id, ok := t.index[" "]; ok {
			toks = append(toks, id)
		}
	}
	for i := 0; i < len(text); {
		// One UTF-8 code point (at most 4 bytes), as llama2.c groups them.
		j := i + 1
		for j < len(text) && text[j]&0xC0 == 0x80 && j-i < 4 {
			j++
		}
		if id, ok := t.index[text[i:j]]; ok {
			toks = append(toks, id)
		} else {
			for k := i; k < j; k++ {
				toks = append(toks, int(text[k])+3)
			}
		}
		i = j
	}
	var sb strings.Builder
	for {
		best, bestID, bestIdx := float32(-1e10), -1, -1
		for i := 0; i+1 < len(toks); i++ {
			sb.Reset()
			sb.WriteString(t.pieces[toks[i]])
			sb.WriteString(t.pieces[toks[i+1]])
			if id, ok := t.index[sb.String()]; ok && t.scores[id] > best {
				best, bestID, bestIdx = t.scores[id], id, i
			}
		}
		if bestIdx < 0 {
			break
		}
		toks[bestIdx] = bestID
		toks = append(toks[:bestIdx+1], toks[bestIdx+2:]...)
	}
	if eos {
		toks = append(toks, TokenEOS)
	}
	return toks
}

// Decode returns the bytes that token id stands for after prev: byte
// tokens become their byte, and a leading space after BOS is dropped.
func (t *Tokenizer) Decode(prev, id int) string {
	if id < 0 || id >= len(t.pieces) {
		return ""
	}
	p := t.pieces[id]
	if prev == TokenBOS && strings.HasPrefix(p, " ") {
		p = p[1:]
	}
	if v := t.byteOf[id]; v >= 0 {
		return string([]byte{byte(v)})
	}
	return p
}

// parseByteToken recognises a byte-fallback piece "<0xXX>".
func parseByteToken(p string) (byte, bool) {
	if len(p) != 6 || !strings.HasPrefix(p, "<0x") || p[5] != '>' {
		return 0, false
	}
	var v byte
	for _, c := range p[3:5] {
		v <<= 4
		switch {
		case c >= '0' && c <= '9':
			v |= byte(c - '0')
		case c >= 'A' && c <= 'F':
			v |= byte(c-'A') + 10
		case c >= 'a' && c <= 'f':
			v |= byte(c-'a') + 10
		default:
			return 0, false
		}
	}
	return v, true
}

// DecodeAll decodes ids that follow prev into text.
func (t *Tokenizer) DecodeAll(prev int, ids []int) string {
	var sb strings.Builder
	for _, id := range ids {
		sb.WriteString(t.Decode(prev, id))
		prev = id
	}
	return sb.String()
}

// Encoded returns the tokenizer in llama2.c's file format.
func (t *Tokenizer) Encoded() []byte {
	out := binary.LittleEndian.AppendUint32(nil, uint32(t.maxLen))
	for i, p := range t.pieces {
		out = binary.LittleEndian.AppendUint32(out, math.Float32bits(t.scores[i]))
		out = binary.LittleEndian.AppendUint32(out, uint32(len(p)))
		out = append(out, p...)
	}
	return out
}
