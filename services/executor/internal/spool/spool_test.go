package spool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func entry(id string) Entry {
	return Entry{ID: id, Data: []byte(`{"id":"` + id + `"}`), Header: map[string]string{"traceparent": "00-" + id}}
}

func ids(es []Entry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.ID)
	}
	return out
}

func open(t *testing.T, path string) *Spool {
	t.Helper()
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// What is appended and not marked done is pending after a reopen (a crash
// loses nothing), in the order it was spooled, with its headers.
func TestPendingSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "usage.spool")
	s := open(t, path)
	if err := s.Append(entry("a"), entry("b")); err != nil {
		t.Fatal(err)
	}
	if err := s.Append(entry("c")); err != nil {
		t.Fatal(err)
	}
	if err := s.Done("b", "unknown"); err != nil {
		t.Fatal(err)
	}
	// No Close: the process died.
	s2 := open(t, path)
	got := s2.Pending()
	if want := []string{"a", "c"}; !slices.Equal(ids(got), want) {
		t.Fatalf("pending %v, want %v", ids(got), want)
	}
	if got[0].Header["traceparent"] != "00-a" || string(got[0].Data) != `{"id":"a"}` || got[0].Spooled.IsZero() {
		t.Fatalf("entry a came back as %+v", got[0])
	}
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Mode().Perm() != 0o600 {
		t.Fatalf("spool mode %v, want 0600", info.Mode().Perm())
	}
}

// When every entry is done the file is emptied.
func TestAllDoneEmptiesTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "usage.spool")
	s := open(t, path)
	if err := s.Append(entry("a"), entry("b")); err != nil {
		t.Fatal(err)
	}
	if err := s.Done("a", "b"); err != nil {
		t.Fatal(err)
	}
	if info, err := os.Stat(path); err != nil || info.Size() != 0 {
		t.Fatalf("spool file after all done: %v %v, want empty", info.Size(), err)
	}
	if err := s.Append(entry("c")); err != nil {
		t.Fatal(err)
	}
	if got := ids(open(t, path).Pending()); !slices.Equal(got, []string{"c"}) {
		t.Fatalf("pending %v, want [c]", got)
	}
}

// A line torn by a crash mid-write is dropped; a line that is not a spool
// record is an error naming the file and line.
func TestTornAndCorruptLines(t *testing.T) {
	dir := t.TempDir()
	torn := filepath.Join(dir, "torn.spool")
	if err := os.WriteFile(torn, []byte(`{"id":"a","data":{"id":"a"}}`+"\n"+`{"id":"b","da`), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := ids(open(t, torn).Pending()); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("pending %v, want [a]", got)
	}
	for name, body := range map[string]string{
		"not json":  "garbage\n",
		"no fields": "{}\n",
	} {
		p := filepath.Join(dir, "bad.spool")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(p); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: Open = %v, want ErrCorrupt", name, err)
		}
	}
}

// Many done marks make the file be rewritten with only what is pending.
func TestCompaction(t *testing.T) {
	path := filepath.Join(t.TempDir(), "usage.spool")
	s := open(t, path)
	if err := s.Append(entry("keep")); err != nil {
		t.Fatal(err)
	}
	var batch []Entry
	for i := range 3 * compactAfter {
		batch = append(batch, entry(fmt.Sprint("e", i)))
	}
	if err := s.Append(batch...); err != nil {
		t.Fatal(err)
	}
	for _, e := range batch {
		if err := s.Done(e.ID); err != nil {
			t.Fatal(err)
		}
	}
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size() > int64(compactAfter*200) {
		t.Fatalf("spool of one pending entry is %d bytes after %d done: not compacted", info.Size(), 3*compactAfter)
	}
	if got := ids(open(t, path).Pending()); !slices.Equal(got, []string{"keep"}) {
		t.Fatalf("pending %v, want [keep]", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Append(entry("x")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close = %v, want ErrClosed", err)
	}
}

// An id spooled again after it was done is pending once.
func TestRespooledID(t *testing.T) {
	path := filepath.Join(t.TempDir(), "usage.spool")
	s := open(t, path)
	for _, step := range []func() error{
		func() error { return s.Append(entry("a"), entry("b")) },
		func() error { return s.Done("a") },
		func() error { return s.Append(entry("a")) },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	for _, sp := range []*Spool{s, open(t, path)} {
		if got := ids(sp.Pending()); !slices.Equal(got, []string{"b", "a"}) {
			t.Fatalf("pending %v, want [b a]", got)
		}
	}
}
