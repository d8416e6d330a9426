// Package spool keeps an executor's signed usage events on disk until stream
// USAGE has acknowledged them, so that neither a lost connection nor a
// crash between signing and publishing loses a supplier's pay or a
// customer's bill.
//
// The spool is one append-only file of JSON lines: an event line holds the
// event exactly as it will be published (its id, the bytes and the trace
// context headers of its request), a done line names an event the stream
// acknowledged. Every append is synced before it returns, so an event is
// published only once it is on disk. Opening the spool reads it back,
// drops a line torn by a crash in the middle of a write, and keeps the
// events without a done line: the executor re-publishes them, and the
// stream's de-duplication by Nats-Msg-Id (and settlement's by event id
// beyond that window) makes a second publish of one it had stored harmless.
// The file is rewritten to hold only pending events when it is mostly done
// lines, and emptied when nothing is pending.
package spool

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// Entry is one event waiting for the stream's acknowledgement.
type Entry struct {
	// ID is the event id, its Nats-Msg-Id.
	ID string `json:"id"`
	// Data is the event's JSON as published.
	Data json.RawMessage `json:"data"`
	// Header holds the message headers to publish with it (trace context).
	Header map[string]string `json:"header,omitempty"`
	// Spooled is when the entry was written.
	Spooled time.Time `json:"spooled"`
}

// line is one record of the file: an Entry, or Done naming a finished one.
type line struct {
	*Entry
	Done string `json:"done,omitempty"`
}

// compactAfter is how many done lines may pile up before the file is
// rewritten with only its pending entries.
const compactAfter = 1024

// Spool is the usage spool of one executor. It is safe for concurrent use.
type Spool struct {
	path string

	mu      sync.Mutex
	f       *os.File
	pending map[string]*Entry
	// order lists ids in the order they were spooled; ids no longer
	// pending are dropped from it lazily (tidy).
	order  []string
	done   int // done lines in the file
	closed bool
}

// Open opens (creating it if needed) the spool file at path and reads back
// the entries still pending.
func Open(path string) (*Spool, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("usage spool %s: %w", path, err)
	}
	s := &Spool{path: path, pending: map[string]*Entry{}}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("usage spool %s: %w", path, err)
	}
	if err := s.load(f); err != nil {
		f.Close()
		return nil, err
	}
	f.Close()
	// Start from a file with only the pending entries: it also drops a torn
	// last line for good.
	if err := s.rewrite(); err != nil {
		return nil, err
	}
	return s, nil
}

// load reads every complete line of f.
func (s *Spool) load(f *os.File) error {
	r := bufio.NewReader(f)
	for n := 1; ; n++ {
		b, err := r.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			// A last line without its newline was torn by a crash mid-write:
			// that append never returned, so nothing was published from it.
			return nil
		}
		if err != nil {
			return fmt.Errorf("usage spool %s: %w", s.path, err)
		}
		var l line
		if err := json.Unmarshal(bytes.TrimSpace(b), &l); err != nil {
			return fmt.Errorf("usage spool %s line %d: %w: %w", s.path, n, ErrCorrupt, err)
		}
		switch {
		case l.Done != "":
			delete(s.pending, l.Done)
		case l.Entry != nil && l.ID != "" && len(l.Data) > 0:
			if s.pending[l.ID] == nil {
				s.order = append(s.order, l.ID)
			}
			s.pending[l.ID] = l.Entry
			s.tidy(false)
		default:
			return fmt.Errorf("usage spool %s line %d: %w: neither an event nor a done mark", s.path, n, ErrCorrupt)
		}
	}
}

// rewrite replaces the file with one holding only the pending entries and
// keeps it open for appending. The caller holds s.mu (or owns s alone).
func (s *Spool) rewrite() error {
	tmp := s.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("usage spool %s: %w", tmp, err)
	}
	w := bufio.NewWriter(f)
	s.tidy(true)
	for _, id := range s.order {
		if err := writeLine(w, line{Entry: s.pending[id]}); err != nil {
			f.Close()
			return fmt.Errorf("usage spool %s: %w", tmp, err)
		}
	}
	if err := errors.Join(w.Flush(), f.Sync(), f.Close()); err != nil {
		return fmt.Errorf("usage spool %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, s.path); err != nil {
		return fmt.Errorf("usage spool %s: %w", s.path, err)
	}
	if err := syncDir(filepath.Dir(s.path)); err != nil {
		return fmt.Errorf("usage spool %s: %w", s.path, err)
	}
	if s.f != nil {
		s.f.Close()
	}
	s.f, err = os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("usage spool %s: %w", s.path, err)
	}
	s.done = 0
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func writeLine(w io.Writer, l line) error {
	b, err := json.Marshal(l)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// Append writes entries to the spool and syncs it; when it returns nil they
// survive a crash. An entry whose id is already pending is replaced.
func (s *Spool) Append(entries ...Entry) error {
	if len(entries) == 0 {
		return nil
	}
	var buf bytes.Buffer
	entries = slices.Clone(entries)
	for i := range entries {
		e := &entries[i]
		if e.ID == "" || len(e.Data) == 0 {
			return fmt.Errorf("usage spool: %w: entry without id or data", ErrCorrupt)
		}
		if e.Spooled.IsZero() {
			e.Spooled = time.Now().UTC()
		}
		if err := writeLine(&buf, line{Entry: e}); err != nil {
			return fmt.Errorf("usage spool: %w", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if _, err := s.f.Write(buf.Bytes()); err != nil {
		return fmt.Errorf("usage spool %s: %w", s.path, err)
	}
	if err := s.f.Sync(); err != nil {
		return fmt.Errorf("usage spool %s: %w", s.path, err)
	}
	for _, e := range entries {
		if s.pending[e.ID] == nil {
			s.order = append(s.order, e.ID)
		}
		s.pending[e.ID] = &e
	}
	return nil
}

// Done marks the entries with ids as acknowledged by the stream. Ids that
// are not pending are ignored. Losing a done mark in a crash only means
// one more (de-duplicated) publish, so it is not synced.
func (s *Spool) Done(ids ...string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	var buf bytes.Buffer
	marked := 0
	for _, id := range ids {
		if s.pending[id] == nil {
			continue
		}
		delete(s.pending, id)
		if err := writeLine(&buf, line{Done: id}); err != nil {
			return fmt.Errorf("usage spool: %w", err)
		}
		marked++
	}
	if marked == 0 {
		return nil
	}
	s.tidy(false)
	if len(s.pending) == 0 {
		// Nothing pending: start the file afresh.
		if err := s.f.Truncate(0); err != nil {
			return fmt.Errorf("usage spool %s: %w", s.path, err)
		}
		s.done = 0
		return nil
	}
	if s.done+marked > compactAfter && s.done+marked > 2*len(s.pending) {
		return s.rewrite()
	}
	if _, err := s.f.Write(buf.Bytes()); err != nil {
		return fmt.Errorf("usage spool %s: %w", s.path, err)
	}
	s.done += marked
	return nil
}

// Pending returns the entries not yet acknowledged, oldest first.
func (s *Spool) Pending() []Entry {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tidy(true)
	out := make([]Entry, 0, len(s.order))
	for _, id := range s.order {
		out = append(out, *s.pending[id])
	}
	return out
}

// tidy drops finished ids from s.order: always when all is true, else only
// once they outnumber the pending ones, so that marking an entry done costs
// O(1) on average. The caller holds s.mu.
func (s *Spool) tidy(all bool) {
	if len(s.order) == len(s.pending) || (!all && len(s.order) < 2*len(s.pending)+64) {
		return
	}
	// An id spooled again after it was done appears twice: the last one is
	// the pending entry.
	seen := make(map[string]bool, len(s.pending))
	kept := make([]string, 0, len(s.pending))
	for i := len(s.order) - 1; i >= 0; i-- {
		id := s.order[i]
		if s.pending[id] != nil && !seen[id] {
			seen[id] = true
			kept = append(kept, id)
		}
	}
	slices.Reverse(kept)
	s.order = kept
}

// Len is the number of pending entries.
func (s *Spool) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pending)
}

// Close closes the file; pending entries stay in it for the next Open.
func (s *Spool) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.f.Close()
}
