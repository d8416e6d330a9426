package wire

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestRoutedRoundTrip(t *testing.T) {
	r := Routed{Rows: 2, Dim: 3, K: 2, X: []float32{1, 2, 3, 4, 5, 6}, Experts: []int32{0, 3, 2, -1}, Weights: []float32{0.25, 0.75, 1, 0}}
	b := AppendRouted(nil, r)
	got, err := DecodeRouted(b, 3, 4)
	if err != nil {
		t.Fatal(err)
	}
	if got.Rows != 2 || got.K != 2 || got.X[5] != 6 || got.Experts[1] != 3 || got.Experts[3] != -1 || got.Weights[1] != 0.75 {
		t.Fatalf("%+v", got)
	}
}

func TestRoutedRejectsBadPayloads(t *testing.T) {
	good := Routed{Rows: 1, Dim: 2, K: 1, X: []float32{1, 2}, Experts: []int32{1}, Weights: []float32{1}}
	cases := map[string][]byte{
		"expert out of range":   AppendRouted(nil, Routed{Rows: 1, Dim: 2, K: 1, X: []float32{1, 2}, Experts: []int32{4}, Weights: []float32{1}}),
		"weighted padding":      AppendRouted(nil, Routed{Rows: 1, Dim: 2, K: 1, X: []float32{1, 2}, Experts: []int32{-1}, Weights: []float32{1}}),
		"wrong width":           AppendRouted(nil, Routed{Rows: 1, Dim: 1, K: 1, X: []float32{1}, Experts: []int32{1}, Weights: []float32{1}}),
		"missing weights":       AppendRouted(nil, good)[:len(AppendRouted(nil, good))-20],
		"trailing bytes":        append(AppendRouted(nil, good), 0),
		"no choices":            AppendF32(nil, 1, 2, []float32{1, 2}),
		"choices of other rows": append(AppendF32(nil, 1, 2, []float32{1, 2}), append(AppendI32Rows(nil, 2, 1, []int32{1, 1}), AppendF32(nil, 2, 1, []float32{1, 1})...)...),
	}
	for name, b := range cases {
		if _, err := DecodeRouted(b, 2, 4); !errors.Is(err, ErrFrame) {
			t.Errorf("%s: err %v, want ErrFrame", name, err)
		}
	}
}

func TestExpertLoadAdd(t *testing.T) {
	a := ExpertLoad{Model: "m", Layers: 1, Experts: 2, Counts: [][]int64{{1, 2}}, Tokens: 2}
	if err := a.Add(&ExpertLoad{Model: "m", Layers: 1, Experts: 2, Counts: [][]int64{{3, 0}}, Tokens: 1}); err != nil {
		t.Fatal(err)
	}
	if a.Counts[0][0] != 4 || a.Counts[0][1] != 2 || a.Tokens != 3 {
		t.Fatalf("%+v", a)
	}
	if err := a.Add(&ExpertLoad{Layers: 2, Experts: 2}); err == nil {
		t.Fatal("counts of another shape added")
	}
	if err := (&ExpertLoad{Model: "m", Layers: 1, Experts: 2, Counts: [][]int64{{1}}}).Validate(); err == nil {
		t.Fatal("ragged counts accepted")
	}
}

// FuzzDecodeRouted: a routed payload comes from the network; DecodeRouted
// refuses it or returns rows, choices and weights of consistent sizes with
// every expert in range.
func FuzzDecodeRouted(f *testing.F) {
	f.Add(AppendRouted(nil, Routed{Rows: 2, Dim: 2, K: 1, X: []float32{1, 2, 3, 4}, Experts: []int32{0, 3}, Weights: []float32{1, 1}}))
	f.Add(AppendF32(nil, 1, 2, []float32{1, 2}))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRouted(b, 2, 4)
		if err != nil {
			return
		}
		if r.Rows < 1 || r.K < 1 || len(r.X) != 2*r.Rows || len(r.Experts) != r.Rows*r.K || len(r.Weights) != r.Rows*r.K {
			t.Fatalf("accepted %d rows of %d choices with %d values, %d experts, %d weights", r.Rows, r.K, len(r.X), len(r.Experts), len(r.Weights))
		}
		for _, e := range r.Experts {
			if e < -1 || e >= 4 {
				t.Fatalf("accepted expert %d", e)
			}
		}
	})
}

// HdrHeld round-trips and names what is wrong with a bad value.
func TestHeldHeader(t *testing.T) {
	held := []bool{false, true, false, true}
	v := FormatHeld(held)
	if v != "1,3" {
		t.Fatalf("FormatHeld = %q, want 1,3", v)
	}
	got, err := ParseHeld(v, 4)
	if err != nil || !slices.Equal(got, held) {
		t.Fatalf("ParseHeld(%q) = %v, %v", v, got, err)
	}
	if got, err := ParseHeld("", 4); err != nil || slices.Contains(got, true) {
		t.Fatalf("empty value: %v, %v", got, err)
	}
	for _, bad := range []string{"4", "-1", "1,1", "x", "1,", ","} {
		if _, err := ParseHeld(bad, 4); err == nil || !strings.Contains(err.Error(), HdrHeld) {
			t.Errorf("ParseHeld(%q): %v, want an error naming %s", bad, err, HdrHeld)
		}
	}
}

// FuzzParseHeld: the header comes from the network; ParseHeld refuses it
// or returns one flag per expert, and formats back to what it parsed.
func FuzzParseHeld(f *testing.F) {
	f.Add("0,2")
	f.Add("")
	f.Add("7,")
	f.Fuzz(func(t *testing.T, v string) {
		held, err := ParseHeld(v, 8)
		if err != nil {
			return
		}
		if len(held) != 8 {
			t.Fatalf("%d flags for 8 experts", len(held))
		}
		again, err := ParseHeld(FormatHeld(held), 8)
		if err != nil || !slices.Equal(again, held) {
			t.Fatalf("%q parsed to %v, which formats to one that parses to %v (%v)", v, held, again, err)
		}
	})
}
