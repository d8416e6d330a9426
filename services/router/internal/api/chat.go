package api

import (
	"net/http"
	"strings"

	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/router/internal/generate"
)

// ChatPrompt renders chat messages into the prompt the model continues. The
// demo model is a story model with no chat training, so the template is
// plain text: system and user turns as paragraphs, earlier assistant turns
// verbatim; the model's continuation is the reply.
func ChatPrompt(msgs []wire.ChatMessage) (string, *apiError) {
	if len(msgs) == 0 {
		return "", badRequest("messages must not be empty")
	}
	var parts []string
	for i, m := range msgs {
		switch m.Role {
		case "system", "user", "assistant", "developer":
		default:
			return "", badRequest("messages[%d].role %q: want system, user or assistant", i, m.Role)
		}
		if c := strings.TrimSpace(m.Content); c != "" {
			parts = append(parts, c)
		}
	}
	if len(parts) == 0 {
		return "", badRequest("messages have no content")
	}
	return strings.Join(parts, "\n"), nil
}

func (s *Server) chatCompletions(w http.ResponseWriter, r *http.Request) {
	who, ok := s.authenticate(w, r)
	if !ok {
		return
	}
	var body wire.ChatCompletionRequest
	if e := s.decodeBody(r, &body); e != nil {
		writeAPIError(w, e)
		return
	}
	prompt, e := ChatPrompt(body.Messages)
	if e != nil {
		writeAPIError(w, e)
		return
	}
	maxTokens := body.MaxTokens
	if body.MaxCompletion != nil {
		maxTokens = body.MaxCompletion
	}
	req, e := s.toRequest(body.Model, prompt, maxTokens, body.Temperature, body.TopP, body.Seed, body.N, body.Stop)
	if e != nil {
		writeAPIError(w, e)
		return
	}
	req.ID = "chatcmpl-" + strings.TrimPrefix(req.ID, "cmpl-")
	req.Customer = who.Customer
	s.serve(w, r, req, who, body.Stream, body.StreamOptions, chatShape{})
}

type chatShape struct{}

func (chatShape) full(req generate.Request, res *generate.Result, created int64) any {
	fr := res.FinishReason
	return wire.ChatCompletionResponse{ID: req.ID, Object: "chat.completion", Created: created, Model: req.Model,
		Choices: []wire.ChatChoice{{Index: 0, Message: &wire.ChatMessage{Role: "assistant", Content: res.Text}, FinishReason: &fr}}, Usage: usageOf(res)}
}

func (chatShape) start(req generate.Request, created int64) any {
	return wire.ChatCompletionResponse{ID: req.ID, Object: "chat.completion.chunk", Created: created, Model: req.Model,
		Choices: []wire.ChatChoice{{Index: 0, Delta: &wire.ChatMessage{Role: "assistant"}}}}
}

func (chatShape) chunk(req generate.Request, text string, created int64) any {
	return wire.ChatCompletionResponse{ID: req.ID, Object: "chat.completion.chunk", Created: created, Model: req.Model,
		Choices: []wire.ChatChoice{{Index: 0, Delta: &wire.ChatMessage{Content: text}}}}
}

func (chatShape) end(req generate.Request, res *generate.Result, created int64, usageFollows bool) any {
	fr := res.FinishReason
	out := wire.ChatCompletionResponse{ID: req.ID, Object: "chat.completion.chunk", Created: created, Model: req.Model,
		Choices: []wire.ChatChoice{{Index: 0, Delta: &wire.ChatMessage{}, FinishReason: &fr}}}
	if !usageFollows {
		out.Usage = usageOf(res)
	}
	return out
}

func (chatShape) usage(req generate.Request, res *generate.Result, created int64) any {
	return wire.ChatCompletionResponse{ID: req.ID, Object: "chat.completion.chunk", Created: created, Model: req.Model, Choices: []wire.ChatChoice{}, Usage: usageOf(res)}
}
