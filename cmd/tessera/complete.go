package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// hdrStreamInbox is the router's streaming header for NATS requests.
const hdrStreamInbox = "Tessera-Stream-Inbox"

func completeCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("complete", flag.ContinueOnError)
	fs.SetOutput(stderr)
	model := fs.String("m", "stories260k", "model id")
	maxTokens := fs.Int("n", 128, "maximum tokens to generate")
	temp := fs.Float64("t", 0.8, "temperature (0: greedy)")
	topP := fs.Float64("p", 0.9, "top-p")
	seed := fs.Int64("s", 0, "seed (0: random)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	prompt := strings.Join(fs.Args(), " ")
	if prompt == "" {
		return fmt.Errorf(`complete: give a prompt, e.g. tessera complete -m stories260k "Once upon a time"`)
	}
	c, err := connectGrid(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	body := wire.CompletionRequest{Model: *model, Prompt: prompt, MaxTokens: maxTokens, Temperature: temp, TopP: topP, Stream: true}
	if *seed != 0 {
		body.Seed = seed
	}
	b, _ := json.Marshal(body)
	inbox := nats.NewInbox()
	chunks := make(chan *nats.Msg, 256)
	sub, err := c.NC.ChanSubscribe(inbox, chunks)
	if err != nil {
		return err
	}
	defer sub.Unsubscribe()
	msg := nats.NewMsg(subjects.Completions)
	msg.Header.Set(hdrStreamInbox, inbox)
	if k := os.Getenv("TESSERA_API_KEY"); k != "" {
		msg.Header.Set("Authorization", "Bearer "+k)
	}
	msg.Data = b
	fmt.Fprint(stdout, prompt)
	done := make(chan *nats.Msg, 1)
	errc := make(chan error, 1)
	go func() {
		r, err := c.NC.RequestMsgWithContext(ctx, msg)
		if err != nil {
			errc <- err
			return
		}
		done <- r
	}()
	for {
		select {
		case m := <-chunks:
			var ch wire.CompletionResponse
			if json.Unmarshal(m.Data, &ch) == nil && len(ch.Choices) > 0 {
				fmt.Fprint(stdout, ch.Choices[0].Text)
			}
		case r := <-done:
			// Let chunks published before the reply arrive first.
			time.Sleep(20 * time.Millisecond)
			for len(chunks) > 0 {
				m := <-chunks
				var ch wire.CompletionResponse
				if json.Unmarshal(m.Data, &ch) == nil && len(ch.Choices) > 0 {
					fmt.Fprint(stdout, ch.Choices[0].Text)
				}
			}
			fmt.Fprintln(stdout)
			if code := r.Header.Get("Nats-Service-Error-Code"); code != "" {
				return fmt.Errorf("%s %s", code, r.Header.Get("Nats-Service-Error"))
			}
			var res wire.CompletionResponse
			if err := json.Unmarshal(r.Data, &res); err == nil && res.Usage != nil {
				fmt.Fprintf(stderr, "[%d prompt + %d completion tokens, finish: %s]\n", res.Usage.PromptTokens, res.Usage.CompletionTokens, deref(res.Choices[0].FinishReason))
			}
			return nil
		case err := <-errc:
			fmt.Fprintln(stdout)
			return err
		}
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}
