package api

import (
	"context"
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"
	"go.opentelemetry.io/otel"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/telemetry"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/router/internal/generate"
)

// HdrStreamInbox names, on a NATS completion request with stream true, the
// subject that receives each chunk as it is generated; the final response
// is the request's reply.
const HdrStreamInbox = "Tessera-Stream-Inbox"

// AddNATS registers the router's micro service ("router") with the
// completions, chat and models endpoints on nc.
func (s *Server) AddNATS(nc *nats.Conn, version string) (micro.Service, error) {
	svc, err := micro.AddService(nc, micro.Config{Name: "router", Version: version, Description: "OpenAI-compatible completions over NATS"})
	if err != nil {
		return nil, err
	}
	eps := []struct {
		name, subject string
		h             micro.HandlerFunc
	}{
		{"completions", subjects.Completions, s.natsCompletion},
		{"chat", subjects.ChatCompletions, s.natsChat},
		{"models", subjects.Models, func(r micro.Request) { _ = r.RespondJSON(s.ModelList()) }},
	}
	for _, ep := range eps {
		// Each request runs in its own goroutine: a long generation must not
		// hold up the next request.
		h := ep.h
		if err := svc.AddEndpoint(ep.name, micro.HandlerFunc(func(r micro.Request) { go h(r) }), micro.WithEndpointSubject(ep.subject)); err != nil {
			return nil, err
		}
	}
	return svc, nil
}

func natsError(r micro.Request, e *apiError) {
	c := e.code
	b, _ := json.Marshal(wire.ErrorResponse{Error: wire.ErrorBody{Message: e.msg, Type: e.typ, Code: &c}})
	var opts []micro.RespondOpt
	if e.retryAfter > 0 {
		opts = append(opts, micro.WithHeaders(micro.Headers{"Retry-After": []string{strconv.Itoa(int(math.Ceil(e.retryAfter.Seconds())))}}))
	}
	_ = r.Error(strconv.Itoa(e.status), e.msg, b, opts...)
}

func (s *Server) natsPrincipal(r micro.Request) (Principal, *apiError) {
	token, _ := strings.CutPrefix(r.Headers().Get("Authorization"), "Bearer ")
	p, err := s.Auth.Principal(context.Background(), strings.TrimSpace(token))
	if err != nil {
		return Principal{}, classify(err)
	}
	return p, nil
}

func (s *Server) natsCompletion(r micro.Request) {
	who, e := s.natsPrincipal(r)
	if e != nil {
		natsError(r, e)
		return
	}
	var body wire.CompletionRequest
	if err := json.Unmarshal(r.Data(), &body); err != nil {
		natsError(r, badRequest("malformed JSON body: %v", err))
		return
	}
	req, e := s.toRequest(body.Model, body.Prompt, body.MaxTokens, body.Temperature, body.TopP, body.Seed, body.N, body.Stop)
	if e != nil {
		natsError(r, e)
		return
	}
	req.Customer = who.Customer
	s.natsServe(r, req, who, body.Stream, completionShape{})
}

func (s *Server) natsChat(r micro.Request) {
	who, e := s.natsPrincipal(r)
	if e != nil {
		natsError(r, e)
		return
	}
	var body wire.ChatCompletionRequest
	if err := json.Unmarshal(r.Data(), &body); err != nil {
		natsError(r, badRequest("malformed JSON body: %v", err))
		return
	}
	prompt, e := ChatPrompt(body.Messages)
	if e != nil {
		natsError(r, e)
		return
	}
	req, e := s.toRequest(body.Model, prompt, body.MaxTokens, body.Temperature, body.TopP, body.Seed, body.N, body.Stop)
	if e != nil {
		natsError(r, e)
		return
	}
	req.Customer = who.Customer
	s.natsServe(r, req, who, body.Stream, chatShape{})
}

// natsServe generates req; with stream set, chunks go to the subject named
// in the Tessera-Stream-Inbox header.
func (s *Server) natsServe(r micro.Request, req generate.Request, who Principal, stream bool, shape responseShape) {
	// A caller's trace context makes the request part of its trace.
	ctx := otel.GetTextMapPropagator().Extract(context.Background(), telemetry.HeaderCarrier(r.Headers()))
	if s.RequestTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.RequestTimeout)
		defer cancel()
	}
	ticket, err := s.admit(ctx, &req, who)
	if err != nil {
		natsError(r, classify(err))
		return
	}
	used := 0
	defer func() { ticket.Done(used) }()
	created := time.Now().Unix()
	var emit func(string, int)
	if stream {
		inbox := r.Headers().Get(HdrStreamInbox)
		if inbox == "" {
			natsError(r, badRequest("stream is true but the %s header names no subject", HdrStreamInbox))
			return
		}
		nc := s.Engine.Conn()
		emit = func(text string, _ int) {
			b, _ := json.Marshal(shape.chunk(req, text, created))
			_ = nc.Publish(inbox, b)
		}
	}
	res, err := s.Engine.Generate(ctx, req, emit)
	if err != nil {
		natsError(r, classify(err))
		return
	}
	used = res.PromptTokens + len(res.Tokens)
	_ = r.RespondJSON(shape.full(req, res, created))
}
