package api

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/router/internal/generate"
	"github.com/tessera-grid/tessera/services/router/internal/grid"
)

// anyKey accepts every API key but "bad".
type anyKey struct{}

func (anyKey) Principal(_ context.Context, token string) (Principal, error) {
	if token == "bad" {
		return Principal{}, ErrUnauthorized
	}
	return Principal{Customer: "fuzz"}, nil
}

var _ Authenticator = anyKey{}

// FuzzHTTPBodies sends arbitrary bodies and keys to the real HTTP handler of
// a router that serves no model yet (so that no request reaches the grid):
// every answer is an OpenAI-shaped client error, never a server error or a
// panic, whatever the bytes.
func FuzzHTTPBodies(f *testing.F) {
	view := grid.New(nil, slog.New(slog.NewTextHandler(io.Discard, nil)))
	s := &Server{
		Engine: generate.New(nil, view, slog.New(slog.NewTextHandler(io.Discard, nil)), 0, 0, generate.RouteCosts{}, 0), View: view, Auth: anyKey{},
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), MaxBody: 4096, DefaultMaxTokens: 16,
	}
	h := s.Handler()
	paths := []string{"/v1/completions", "/v1/chat/completions"}
	f.Add(uint8(0), "k", []byte(`{"model":"stories260k","prompt":"Once upon a time","max_tokens":8,"temperature":0}`))
	f.Add(uint8(0), "k", []byte(`{"model":"m","prompt":"p","stop":["a","b","c","d","e"],"n":2,"seed":-1,"top_p":7}`))
	f.Add(uint8(1), "k", []byte(`{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}`))
	f.Add(uint8(1), "k", []byte(`{"model":"m","messages":[{"role":"tool","content":""}]}`))
	f.Add(uint8(1), "bad", []byte(`{}`))
	f.Add(uint8(0), "k", bytes.Repeat([]byte("x"), 5000))
	f.Fuzz(func(t *testing.T, path uint8, key string, body []byte) {
		r := httptest.NewRequest(http.MethodPost, paths[int(path)%len(paths)], bytes.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+key)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code < 400 || w.Code >= 500 {
			t.Fatalf("status %d for %q: %s", w.Code, body, w.Body.Bytes())
		}
		var e wire.ErrorResponse
		if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Error.Message == "" || e.Error.Type == "" {
			t.Fatalf("error body %q: %v", w.Body.Bytes(), err)
		}
	})
}

// FuzzChatPrompt: any messages render to a prompt or a client error.
func FuzzChatPrompt(f *testing.F) {
	f.Add([]byte(`[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]`))
	f.Add([]byte(`[{"role":"user","content":"   "}]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var msgs []wire.ChatMessage
		if json.Unmarshal(data, &msgs) != nil {
			return
		}
		p, e := ChatPrompt(msgs)
		if e != nil {
			if e.status != http.StatusBadRequest {
				t.Fatalf("status %d", e.status)
			}
			return
		}
		if p == "" {
			t.Fatal("empty prompt accepted")
		}
	})
}
