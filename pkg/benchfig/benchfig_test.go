package benchfig

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

func TestRecordToMerges(t *testing.T) {
	p := filepath.Join(t.TempDir(), "results.json")
	if err := RecordTo(p, map[string]float64{"a_tok_s": 1, "b_ms": 2}); err != nil {
		t.Fatal(err)
	}
	if err := RecordTo(p, map[string]float64{"b_ms": 3, "c_us": 4.5}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]float64
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	want := map[string]float64{"a_tok_s": 1, "b_ms": 3, "c_us": 4.5}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("%s: got %v want %v", k, got[k], v)
		}
	}
}
