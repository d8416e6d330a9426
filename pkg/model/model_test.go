package model

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/tessera-grid/tessera/pkg/testmodel"
)

func demoBytes(t testing.TB) (ck, tok []byte) {
	t.Helper()
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	ck, err = os.ReadFile(cp)
	if err != nil {
		t.Fatal(err)
	}
	tok, err = os.ReadFile(tp)
	if err != nil {
		t.Fatal(err)
	}
	return ck, tok
}

func TestCheckpointShape(t *testing.T) {
	b, _ := demoBytes(t)
	ck, err := ParseCheckpoint("stories260K.bin", b)
	if err != nil {
		t.Fatal(err)
	}
	c := ck.Config
	if c.Dim != 64 || c.HiddenDim != 172 || c.Layers != 5 || c.Heads != 8 || c.KVHeads != 4 || c.Vocab != 512 || c.SeqLen != 512 || !c.SharedClassifier {
		t.Fatalf("config %+v", c)
	}
	if got := ParamCount(c); got != 260032 {
		t.Fatalf("param count %d", got)
	}
	if !bytes.Equal(ck.Encode(), zeroRope(b, c.SeqLen*HeadSize(c))) {
		t.Fatal("Encode does not round-trip the checkpoint")
	}
}

// zeroRope returns b with the legacy rotary tables (just before the end, as
// the classifier is shared) zeroed, as Encode writes them.
func zeroRope(b []byte, floats int) []byte {
	out := append([]byte{}, b...)
	clear(out[len(out)-4*floats:])
	return out
}

func TestCheckpointErrorsNameFileAndOffset(t *testing.T) {
	b, _ := demoBytes(t)
	cases := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "offset 0"},
		{"header only", b[:20], "offset 20"},
		{"truncated", b[:len(b)-100], "truncated"},
		{"trailing", append(append([]byte{}, b...), 1, 2, 3, 4), "trailing bytes at offset 1056540"},
		{"bad heads", func() []byte { c := append([]byte{}, b...); c[12] = 7; return c }(), "offset 0"},
		{"negative dim", func() []byte { c := append([]byte{}, b...); c[3] = 0x80; return c }(), "dim"},
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

func TestTokenizerMatchesReference(t *testing.T) {
	_, b := demoBytes(t)
	tok, err := ParseTokenizer("tok512.bin", b, 512)
	if err != nil {
		t.Fatal(err)
	}
	got := tok.Encode(testmodel.Prompt, true, false)
	if len(got) != len(testmodel.PromptIDs) {
		t.Fatalf("encode: %v want %v", got, testmodel.PromptIDs)
	}
	for i := range got {
		if got[i] != testmodel.PromptIDs[i] {
			t.Fatalf("encode: %v want %v", got, testmodel.PromptIDs)
		}
	}
	if text := tok.DecodeAll(378, testmodel.GreedyIDs); text != testmodel.GreedyText {
		t.Fatalf("decode: %q", text)
	}
	if !bytes.Equal(tok.Encoded(), b) {
		t.Fatal("Encoded does not round-trip the tokenizer file")
	}
	// Characters outside the vocabulary fall back to byte tokens.
	ids := tok.Encode("é", false, false)
	if text := tok.DecodeAll(0, ids); text != " é" {
		t.Fatalf("byte fallback: %v decodes to %q", ids, text)
	}
	if ids := tok.Encode("", true, false); len(ids) != 1 || ids[0] != TokenBOS {
		t.Fatalf("empty text: %v", ids)
	}
}

func TestTokenizerErrorsNameFileAndOffset(t *testing.T) {
	_, b := demoBytes(t)
	cases := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "offset 0"},
		{"truncated record", b[:100], "truncated at offset"},
		{"bad length", func() []byte { c := append([]byte{}, b...); c[8+3] = 0x7f; return c }(), "offset 4"},
		{"trailing", append(append([]byte{}, b...), 0), "trailing bytes at offset 6227"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseTokenizer("t.bin", tc.data, 512)
			if err == nil || !strings.Contains(err.Error(), "t.bin") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error naming t.bin and %q", err, tc.want)
			}
		})
	}
}

func FuzzParseCheckpoint(f *testing.F) {
	b, _ := demoBytes(f)
	f.Add(b[:28])
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		ck, err := ParseCheckpoint("fuzz.bin", data)
		if err == nil && ValidateConfig(ck.Config) != nil {
			t.Fatal("accepted an invalid config")
		}
	})
}

func FuzzParseTokenizer(f *testing.F) {
	_, b := demoBytes(f)
	f.Add(b)
	f.Add(b[:50])
	f.Fuzz(func(t *testing.T, data []byte) {
		tok, err := ParseTokenizer("fuzz.bin", data, 512)
		if err != nil {
			return
		}
		ids := tok.Encode("Once upon a time é", true, true)
		_ = tok.DecodeAll(0, ids)
	})
}
