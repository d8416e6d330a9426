// Package api is the router's OpenAI-compatible front door: HTTP
// (GET /v1/models, POST /v1/completions, POST /v1/chat/completions, with
// server-sent events when stream is true) and the same operations as NATS
// requests for in-grid clients.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"

	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/router/internal/admission"
	"github.com/tessera-grid/tessera/services/router/internal/generate"
	"github.com/tessera-grid/tessera/services/router/internal/grid"
)

// Principal is who a request is from.
type Principal struct {
	Customer string
	// Limits overrides the default quotas when set.
	Limits *admission.Limits
}

// Authenticator maps a request's API key to its principal.
type Authenticator interface {
	// Principal returns the principal of the bearer token (empty when absent).
	Principal(ctx context.Context, token string) (Principal, error)
}

// HdrFailovers, on a response that is not streamed, says how many times the
// request changed route after a stage failed (0 when nothing failed).
const HdrFailovers = "Tessera-Failovers"

// ErrUnauthorized is returned by an Authenticator for a missing or bad key.
var ErrUnauthorized = errors.New("invalid API key")

// Server serves the API.
type Server struct {
	Engine *generate.Engine
	View   *grid.View
	Auth   Authenticator
	Log    *slog.Logger
	// Admission enforces quotas; nil admits everything.
	Admission *admission.Controller
	// MaxBody caps request bodies in bytes.
	MaxBody int64
	// DefaultMaxTokens applies when a request gives none (OpenAI: 16).
	DefaultMaxTokens int
	// RequestTimeout bounds a whole request.
	RequestTimeout time.Duration
}

// Handler returns the HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", s.models)
	mux.HandleFunc("POST /v1/completions", s.completions)
	mux.HandleFunc("POST /v1/chat/completions", s.chatCompletions)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "invalid_request_error", "not_found", fmt.Sprintf("no route for %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// apiError is an error with its HTTP status and OpenAI type and code.
type apiError struct {
	status     int
	typ        string
	code       string
	msg        string
	retryAfter time.Duration
}

func (e *apiError) Error() string { return e.msg }

func badRequest(format string, args ...any) *apiError {
	return &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", code: "invalid_request", msg: fmt.Sprintf(format, args...)}
}

// classify maps an engine error to its API error.
func classify(err error) *apiError {
	var ae *apiError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, grid.ErrUnknownModel):
		return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "model_not_found", msg: err.Error()}
	case errors.Is(err, generate.ErrBadRequest):
		return &apiError{status: http.StatusBadRequest, typ: "invalid_request_error", code: "invalid_request", msg: err.Error()}
	case errors.Is(err, admission.ErrLimited):
		var l *admission.Limited
		errors.As(err, &l)
		return &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "rate_limit_exceeded", msg: err.Error(), retryAfter: l.RetryAfter}
	case errors.Is(err, ErrUnauthorized):
		return &apiError{status: http.StatusUnauthorized, typ: "invalid_request_error", code: "invalid_api_key", msg: err.Error()}
	case errors.Is(err, generate.ErrUnavailable), errors.Is(err, grid.ErrNoPlan):
		return &apiError{status: http.StatusServiceUnavailable, typ: "server_error", code: "unavailable", msg: err.Error()}
	case errors.Is(err, context.DeadlineExceeded):
		return &apiError{status: http.StatusGatewayTimeout, typ: "server_error", code: "timeout", msg: "request timed out"}
	case errors.Is(err, context.Canceled):
		return &apiError{status: 499, typ: "server_error", code: "cancelled", msg: "request cancelled"}
	}
	return &apiError{status: http.StatusInternalServerError, typ: "server_error", code: "internal", msg: err.Error()}
}

func writeError(w http.ResponseWriter, status int, typ, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	c := code
	_ = json.NewEncoder(w).Encode(wire.ErrorResponse{Error: wire.ErrorBody{Message: msg, Type: typ, Code: &c}})
}

func writeAPIError(w http.ResponseWriter, e *apiError) {
	if e.retryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(e.retryAfter.Seconds()))))
	}
	writeError(w, e.status, e.typ, e.code, e.msg)
}

// authenticate returns the request's principal or writes a 401.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) (Principal, bool) {
	token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	p, err := s.Auth.Principal(r.Context(), strings.TrimSpace(token))
	if err != nil {
		writeAPIError(w, classify(err))
		return Principal{}, false
	}
	return p, true
}

func (s *Server) models(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.authenticate(w, r); !ok {
		return
	}
	writeJSON(w, http.StatusOK, s.ModelList())
}

// ModelList lists the models with a plan.
func (s *Server) ModelList() wire.ModelList {
	list := wire.ModelList{Object: "list", Data: []wire.ModelInfo{}}
	for _, m := range s.View.Models() {
		list.Data = append(list.Data, wire.ModelInfo{ID: m.Manifest.ID, Object: "model", Created: m.Manifest.Created.Unix(), OwnedBy: "tessera"})
	}
	return list
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// decodeBody reads a JSON body into v with a size cap, naming what is wrong.
func (s *Server) decodeBody(r *http.Request, v any) *apiError {
	body, err := io.ReadAll(io.LimitReader(r.Body, s.MaxBody+1))
	if err != nil {
		return badRequest("reading body: %v", err)
	}
	if int64(len(body)) > s.MaxBody {
		return &apiError{status: http.StatusRequestEntityTooLarge, typ: "invalid_request_error", code: "too_large", msg: fmt.Sprintf("body larger than %d bytes", s.MaxBody)}
	}
	if err := json.Unmarshal(body, v); err != nil {
		return badRequest("malformed JSON body: %v", err)
	}
	return nil
}

// toRequest converts OpenAI sampling parameters to a generation request.
func (s *Server) toRequest(model, prompt string, maxTokens *int, temperature, topP *float64, seed *int64, n *int, stop []string) (generate.Request, *apiError) {
	req := generate.Request{ID: generate.NewID("cmpl-"), Model: model, Prompt: prompt, MaxTokens: s.DefaultMaxTokens, Temperature: 1, TopP: 1, Stop: stop}
	if model == "" {
		return req, badRequest("model is required")
	}
	if maxTokens != nil {
		req.MaxTokens = *maxTokens
	}
	if temperature != nil {
		req.Temperature = float32(*temperature)
	}
	if topP != nil {
		req.TopP = float32(*topP)
	}
	if n != nil && *n != 1 {
		return req, badRequest("n must be 1, got %d", *n)
	}
	if seed != nil {
		req.Seed = uint64(*seed)
	} else {
		req.Seed = uint64(time.Now().UnixNano())
	}
	return req, nil
}

func (s *Server) completions(w http.ResponseWriter, r *http.Request) {
	who, ok := s.authenticate(w, r)
	if !ok {
		return
	}
	var body wire.CompletionRequest
	if e := s.decodeBody(r, &body); e != nil {
		writeAPIError(w, e)
		return
	}
	req, e := s.toRequest(body.Model, body.Prompt, body.MaxTokens, body.Temperature, body.TopP, body.Seed, body.N, body.Stop)
	if e != nil {
		writeAPIError(w, e)
		return
	}
	req.Customer = who.Customer
	s.serve(w, r, req, who, body.Stream, body.StreamOptions, completionShape{})
}

// serve runs req and writes either one JSON response or an SSE stream.
func (s *Server) serve(w http.ResponseWriter, r *http.Request, req generate.Request, who Principal, stream bool, so *wire.StreamOptions, shape responseShape) {
	// A caller's trace context (W3C traceparent) makes the request part of
	// its trace.
	ctx := otel.GetTextMapPropagator().Extract(r.Context(), propagation.HeaderCarrier(r.Header))
	if s.RequestTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.RequestTimeout)
		defer cancel()
	}
	// Reject bad and over-quota requests before any stream starts.
	ticket, err := s.admit(ctx, &req, who)
	if err != nil {
		writeAPIError(w, classify(err))
		return
	}
	used := 0
	defer func() { ticket.Done(used) }()
	created := time.Now().Unix()
	if !stream {
		res, err := s.Engine.Generate(ctx, req, nil)
		if err != nil {
			writeAPIError(w, classify(err))
			return
		}
		used = res.PromptTokens + len(res.Tokens)
		w.Header().Set(HdrFailovers, strconv.Itoa(res.Failovers))
		writeJSON(w, http.StatusOK, shape.full(req, res, created))
		return
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		writeAPIError(w, &apiError{status: 500, typ: "server_error", code: "internal", msg: "streaming unsupported"})
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("Connection", "keep-alive")
	w.WriteHeader(http.StatusOK)
	send := func(v any) {
		b, _ := json.Marshal(v)
		fmt.Fprintf(w, "data: %s\n\n", b)
		fl.Flush()
	}
	if first := shape.start(req, created); first != nil {
		send(first)
	}
	res, err := s.Engine.Generate(ctx, req, func(text string, _ int) { send(shape.chunk(req, text, created)) })
	if err != nil {
		e := classify(err)
		c := e.code
		send(wire.ErrorResponse{Error: wire.ErrorBody{Message: e.msg, Type: e.typ, Code: &c}})
		fmt.Fprint(w, "data: [DONE]\n\n")
		fl.Flush()
		return
	}
	used = res.PromptTokens + len(res.Tokens)
	send(shape.end(req, res, created, so != nil && so.IncludeUsage))
	if so != nil && so.IncludeUsage {
		send(shape.usage(req, res, created))
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
	fl.Flush()
}

// admit validates req and reserves its tokens under who's quotas.
func (s *Server) admit(ctx context.Context, req *generate.Request, who Principal) (*admission.Ticket, error) {
	_, prompt, err := s.Engine.Validate(req)
	if err != nil {
		return nil, err
	}
	if s.Admission == nil {
		return admission.New(admission.Limits{}, 0, 0).Admit(ctx, who.Customer, 0, nil)
	}
	return s.Admission.Admit(ctx, who.Customer, len(prompt)+req.MaxTokens, who.Limits)
}

func usageOf(res *generate.Result) *wire.Usage {
	return &wire.Usage{PromptTokens: res.PromptTokens, CompletionTokens: len(res.Tokens), TotalTokens: res.PromptTokens + len(res.Tokens)}
}

// responseShape builds the objects of one endpoint's responses.
type responseShape interface {
	full(req generate.Request, res *generate.Result, created int64) any
	start(req generate.Request, created int64) any
	chunk(req generate.Request, text string, created int64) any
	end(req generate.Request, res *generate.Result, created int64, usageFollows bool) any
	usage(req generate.Request, res *generate.Result, created int64) any
}

type completionShape struct{}

func (completionShape) full(req generate.Request, res *generate.Result, created int64) any {
	fr := res.FinishReason
	return wire.CompletionResponse{ID: req.ID, Object: "text_completion", Created: created, Model: req.Model,
		Choices: []wire.CompletionChoice{{Index: 0, Text: res.Text, FinishReason: &fr}}, Usage: usageOf(res), Tokens: res.Tokens}
}

func (completionShape) start(generate.Request, int64) any { return nil }

func (completionShape) chunk(req generate.Request, text string, created int64) any {
	return wire.CompletionResponse{ID: req.ID, Object: "text_completion", Created: created, Model: req.Model,
		Choices: []wire.CompletionChoice{{Index: 0, Text: text}}}
}

func (completionShape) end(req generate.Request, res *generate.Result, created int64, usageFollows bool) any {
	fr := res.FinishReason
	out := wire.CompletionResponse{ID: req.ID, Object: "text_completion", Created: created, Model: req.Model,
		Choices: []wire.CompletionChoice{{Index: 0, Text: "", FinishReason: &fr}}}
	if !usageFollows {
		out.Usage = usageOf(res)
	}
	return out
}

func (completionShape) usage(req generate.Request, res *generate.Result, created int64) any {
	return wire.CompletionResponse{ID: req.ID, Object: "text_completion", Created: created, Model: req.Model, Choices: []wire.CompletionChoice{}, Usage: usageOf(res)}
}
