package e2e

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/services/router"
)

func client(base, key string) openai.Client {
	return openai.NewClient(option.WithBaseURL(base+"/v1/"), option.WithAPIKey(key), option.WithMaxRetries(0))
}

// The official OpenAI Go client streams a completion and a chat completion
// from the grid; at temperature 0 the streamed text equals the non-streamed.
func TestOpenAIClient(t *testing.T) {
	g, base := startGrid(t, 3)
	ctx := context.Background()
	key := router.NewKey()
	if err := router.AddKey(ctx, g.Admin, key, "acme", "test", nil); err != nil {
		t.Fatal(err)
	}
	c := client(base, key)
	params := openai.CompletionNewParams{
		Model:       openai.CompletionNewParamsModel(testmodel.ID),
		Prompt:      openai.CompletionNewParamsPromptUnion{OfString: openai.String(testmodel.Prompt)},
		MaxTokens:   openai.Int(60),
		Temperature: openai.Float(0),
	}
	full, err := c.Completions.New(ctx, params)
	if err != nil {
		t.Fatal(err)
	}
	if full.Choices[0].Text != testmodel.GreedyText || full.Usage.CompletionTokens != 60 || full.Usage.PromptTokens != 5 {
		t.Fatalf("completion %q usage %+v", full.Choices[0].Text, full.Usage)
	}
	stream := c.Completions.NewStreaming(ctx, params)
	var sb strings.Builder
	chunks := 0
	for stream.Next() {
		ch := stream.Current()
		if len(ch.Choices) > 0 {
			sb.WriteString(ch.Choices[0].Text)
		}
		chunks++
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if sb.String() != full.Choices[0].Text || chunks < 10 {
		t.Fatalf("streamed %q in %d chunks, want %q", sb.String(), chunks, full.Choices[0].Text)
	}

	chat := openai.ChatCompletionNewParams{
		Model:       testmodel.ID,
		Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Once upon a time, there was a cat.")},
		MaxTokens:   openai.Int(40),
		Temperature: openai.Float(0),
	}
	cfull, err := c.Chat.Completions.New(ctx, chat)
	if err != nil {
		t.Fatal(err)
	}
	if cfull.Choices[0].Message.Content == "" || cfull.Choices[0].Message.Role != "assistant" || cfull.Usage.CompletionTokens == 0 {
		t.Fatalf("chat %+v", cfull)
	}
	cs := c.Chat.Completions.NewStreaming(ctx, chat)
	sb.Reset()
	for cs.Next() {
		ch := cs.Current()
		if len(ch.Choices) > 0 {
			sb.WriteString(ch.Choices[0].Delta.Content)
		}
	}
	if err := cs.Err(); err != nil {
		t.Fatal(err)
	}
	if sb.String() != cfull.Choices[0].Message.Content {
		t.Fatalf("streamed chat %q, want %q", sb.String(), cfull.Choices[0].Message.Content)
	}

	// Same seed, same output when sampling.
	sampled := params
	sampled.Temperature, sampled.Seed, sampled.TopP = openai.Float(1), openai.Int(42), openai.Float(0.9)
	a, err := c.Completions.New(ctx, sampled)
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Completions.New(ctx, sampled)
	if err != nil {
		t.Fatal(err)
	}
	if a.Choices[0].Text != b.Choices[0].Text {
		t.Fatalf("seed 42 gave %q then %q", a.Choices[0].Text, b.Choices[0].Text)
	}
	// Stop sequences end the text before the stop.
	stopped := params
	stopped.Stop = openai.CompletionNewParamsStopUnion{OfString: openai.String("Lily")}
	s, err := c.Completions.New(ctx, stopped)
	if err != nil {
		t.Fatal(err)
	}
	if want := ", there was a little girl named "; s.Choices[0].Text != want || s.Choices[0].FinishReason != "stop" {
		t.Fatalf("stop: %q (%s), want %q", s.Choices[0].Text, s.Choices[0].FinishReason, want)
	}
}

// Requests need a valid key when the router requires keys.
func TestAPIKeysRequired(t *testing.T) {
	o := testOptions(t)
	o.Executors = 1
	o.Router.HTTPAddr = "127.0.0.1:0"
	g, base := startGridWith(t, o)
	_ = g
	ctx := context.Background()
	for _, key := range []string{"", "tsk-wrong"} {
		c := client(base, key)
		_, err := c.Completions.New(ctx, openai.CompletionNewParams{Model: testmodel.ID, Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("x")}})
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusUnauthorized {
			t.Fatalf("key %q: got %v, want 401", key, err)
		}
	}
}

// A customer over its tokens-per-minute quota gets 429 with Retry-After;
// another customer is unaffected.
func TestQuota(t *testing.T) {
	g, base := startGrid(t, 2)
	ctx := context.Background()
	small, big := router.NewKey(), router.NewKey()
	if err := router.AddKey(ctx, g.Admin, small, "small", "test", &router.Limits{TokensPerMinute: 100}); err != nil {
		t.Fatal(err)
	}
	if err := router.AddKey(ctx, g.Admin, big, "big", "test", nil); err != nil {
		t.Fatal(err)
	}
	body := `{"model":"stories260k","prompt":"Once upon a time","max_tokens":60,"temperature":0}`
	if code, b := post(t, base+"/v1/completions", body, "Authorization", "Bearer "+small); code != 200 {
		t.Fatalf("first request: HTTP %d %s", code, b)
	}
	req, _ := http.NewRequest(http.MethodPost, base+"/v1/completions", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+small)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	ra, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
	if resp.StatusCode != http.StatusTooManyRequests || ra < 1 {
		t.Fatalf("over quota: HTTP %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	for i := 0; i < 3; i++ {
		if code, b := post(t, base+"/v1/completions", body, "Authorization", "Bearer "+big); code != 200 {
			t.Fatalf("other customer: HTTP %d %s", code, b)
		}
	}
}
