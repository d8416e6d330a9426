package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/internal/local"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/svc"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/executor"
	"github.com/tessera-grid/tessera/services/planner"
	"github.com/tessera-grid/tessera/services/registry"
	"github.com/tessera-grid/tessera/services/router"
	"github.com/tessera-grid/tessera/services/settlement"
)

// runConfig configures `tessera run`, read from TESSERA_*; each service also
// reads its own TESSERA_<SERVICE>_* settings.
type runConfig struct {
	// DataDir holds NATS data and executor state.
	DataDir string `env:"DATA_DIR, default=var"`
	// HTTPAddr is where the OpenAI-compatible API listens.
	HTTPAddr string `env:"HTTP_ADDR, default=127.0.0.1:8080"`
	// ConsoleAddr is where the operator console listens (empty: none).
	ConsoleAddr string `env:"CONSOLE_ADDR, default=127.0.0.1:8081"`
	// NATSPort is the embedded NATS server's client port.
	NATSPort int `env:"NATS_PORT, default=4222"`
	// Executors is how many executors to start.
	Executors int `env:"EXECUTORS, default=3"`
	// ModelID, Model and Tokenizer name the model to import and serve.
	ModelID   string `env:"MODEL_ID, default=stories260k"`
	Model     string `env:"MODEL, default=models/stories260k/stories260K.bin"`
	Tokenizer string `env:"TOKENIZER, default=models/stories260k/tok512.bin"`
	// DemoPrompt and DemoMaxTokens shape the demo completion.
	DemoPrompt    string `env:"DEMO_PROMPT, default=Once upon a time"`
	DemoMaxTokens int    `env:"DEMO_MAX_TOKENS, default=60"`
	// DemoCustomer owns the demo API key; DemoAPIKey is the key (empty: a
	// new one is made and printed).
	DemoCustomer string `env:"DEMO_CUSTOMER, default=demo"`
	DemoAPIKey   string `env:"DEMO_API_KEY"`
	// RequireKeys refuses requests without an API key; otherwise they are
	// served as the demo customer, as suits a grid on one's own machine.
	RequireKeys bool `env:"REQUIRE_KEYS, default=false"`
}

func runGrid(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	demo := fs.Bool("demo", false, "exit after the demo completion and usage printout")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: svc.LogLevel()}))
	slog.SetDefault(log)
	var rc runConfig
	o := local.Options{Log: log}
	for _, c := range []struct {
		prefix string
		target any
	}{
		{"TESSERA_", &rc}, {"", &o.NATS}, {router.EnvPrefix, &o.Router}, {registry.EnvPrefix, &o.Registry},
		{planner.EnvPrefix, &o.Planner}, {settlement.EnvPrefix, &o.Settlement}, {executor.EnvPrefix, &o.Executor},
	} {
		if err := config.Load(ctx, c.prefix, c.target); err != nil {
			return err
		}
	}
	o.DataDir, o.NATSPort, o.Executors = rc.DataDir, rc.NATSPort, rc.Executors
	o.Router.HTTPAddr = rc.HTTPAddr
	if o.Router.ConsoleAddr == "" {
		o.Router.ConsoleAddr = rc.ConsoleAddr
	}
	if !rc.RequireKeys && o.Router.AnonymousCustomer == "" {
		o.Router.AnonymousCustomer = rc.DemoCustomer
	}
	if o.Settlement.PriceFile == "" {
		if _, err := os.Stat("deploy/prices.json"); err == nil {
			// The demo's price book, so that usage rows show charges.
			o.Settlement.PriceFile = "deploy/prices.json"
		}
	}
	if os.Getenv(planner.EnvPrefix+"STRATEGY") == "" {
		// The executors of a one-machine grid share its cores: replicas add
		// no compute here, and one pipeline over all of them shows the grid
		// at work. Set TESSERA_PLANNER_STRATEGY=tessera to plan for throughput.
		o.Planner.Strategy = "exo"
	}
	// The executors share this machine's cores through one compute pool.
	o.SharedPool = true
	for _, p := range []string{rc.Model, rc.Tokenizer} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("model file: %w (run from the repository root or set TESSERA_MODEL and TESSERA_TOKENIZER)", err)
		}
	}
	fmt.Fprintf(stdout, "Starting the grid: embedded NATS, registry, planner, router, settlement and %d executors\n", rc.Executors)
	g, err := local.Start(ctx, o)
	if err != nil {
		return err
	}
	defer g.Close()
	m, err := g.Import(ctx, rc.ModelID, rc.Model, rc.Tokenizer, nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "Model %s imported: %d layers in %d fragments (%d bytes)\n", m.ID, m.Config.Layers, len(m.Fragments), m.TotalBytes)
	key := rc.DemoAPIKey
	if key == "" {
		key = router.NewKey()
	}
	if err := router.AddKey(ctx, g.Admin, key, rc.DemoCustomer, "demo", nil); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	plan, err := waitServable(wctx, g, m, min(rc.Executors, m.Config.Layers))
	if err != nil {
		return err
	}
	for _, a := range plan.Assignments {
		fmt.Fprintf(stdout, "  %s holds layers [%d,%d)%s%s\n", a.Node, a.First, a.End, map[bool]string{true: " + embedding"}[a.Embed], map[bool]string{true: " + head"}[a.Head])
	}
	addr, err := g.HTTPAddr(wctx)
	if err != nil {
		return err
	}
	res, err := demoCompletion(wctx, addr, key, rc)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\nDemo completion (%s, temperature 0, %d tokens):\n\n%s%s\n\n", m.ID, res.Usage.CompletionTokens, rc.DemoPrompt, res.Choices[0].Text)
	if err := printUsage(wctx, stdout, o.Settlement, res.ID, len(plan.Assignments)); err != nil {
		return err
	}
	if *demo {
		return nil
	}
	fmt.Fprintf(stdout, "\nServing the OpenAI-compatible API on http://%s (demo customer %q, API key %s)\n", addr, rc.DemoCustomer, key)
	fmt.Fprintf(stdout, "  curl -s %s/v1/completions -H 'Authorization: Bearer %s' -d '{\"model\":\"%s\",\"prompt\":\"Once upon a time\",\"max_tokens\":60,\"temperature\":0}'\n", addr, key, m.ID)
	if o.Router.ConsoleAddr != "" {
		if caddr, err := g.ConsoleAddr(wctx); err == nil {
			fmt.Fprintf(stdout, "Operator console: http://%s/console/\n", caddr)
		}
	}
	fmt.Fprintln(stdout, "Press Ctrl-C to stop.")
	<-ctx.Done()
	fmt.Fprintln(stdout, "Stopping.")
	return nil
}

// waitServable waits for a plan over want nodes whose every node reports its
// fragments loaded.
func waitServable(ctx context.Context, g *local.Grid, m wire.ModelManifest, want int) (*wire.Plan, error) {
	plans, err := g.Admin.JS.KeyValue(ctx, subjects.BucketPlans)
	if err != nil {
		return nil, err
	}
	nodes, err := g.Admin.JS.KeyValue(ctx, subjects.BucketNodes)
	if err != nil {
		return nil, err
	}
	for {
		if p, ok := servable(ctx, plans, nodes, m, want); ok {
			return p, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for %d executors to load %s: %w", want, m.ID, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func servable(ctx context.Context, plans, nodes jetstream.KeyValue, m wire.ModelManifest, want int) (*wire.Plan, bool) {
	e, err := plans.Get(ctx, m.ID)
	if err != nil {
		return nil, false
	}
	var p wire.Plan
	if json.Unmarshal(e.Value(), &p) != nil || len(p.Assignments) < want {
		return nil, false
	}
	for _, a := range p.Assignments {
		ne, err := nodes.Get(ctx, a.Node)
		if err != nil {
			return nil, false
		}
		var r wire.NodeRecord
		if json.Unmarshal(ne.Value(), &r) != nil {
			return nil, false
		}
		have := map[string]bool{}
		for _, f := range r.Heartbeat.Fragments {
			have[f] = true
		}
		for l := a.First; l < a.End; l++ {
			if !have[fmt.Sprintf("%s/layer.%d", m.ID, l)] {
				return nil, false
			}
		}
	}
	return &p, true
}

func demoCompletion(ctx context.Context, addr, key string, rc runConfig) (*wire.CompletionResponse, error) {
	body, _ := json.Marshal(map[string]any{"model": rc.ModelID, "prompt": rc.DemoPrompt, "max_tokens": rc.DemoMaxTokens, "temperature": 0})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/v1/completions", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("demo completion: HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	var out wire.CompletionResponse
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, err
	}
	if len(out.Choices) == 0 || out.Usage == nil {
		return nil, fmt.Errorf("demo completion: response without choices or usage: %s", b)
	}
	return &out, nil
}
