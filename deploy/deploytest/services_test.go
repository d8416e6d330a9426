package deploytest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/deploy/accounts"
	"github.com/tessera-grid/tessera/pkg/fragstore"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
)

// TestServicesWithOwnCredentials runs the registry, planner, router and two
// executors as separate processes on the secured server, each with the
// credentials and environment file tessera-accounts issued for it. Greedy
// completions over HTTP and over NATS (a customer's credentials, streamed
// into its own inbox) give upstream llama2.c's reference text, both
// executors' usage reaches stream USAGE, and the server refused nothing
// that any of them did: their permissions are enough for their work.
func TestServicesWithOwnCredentials(t *testing.T) {
	g, s, admin := startSingle(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	store, err := fragstore.Open(ctx, admin.JS)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.ImportCheckpoint(ctx, testmodel.ID, cp, tp, nil); err != nil {
		t.Fatal(err)
	}

	env, _ := g.env(t, s.URL, accounts.RoleRegistry, "registry-1")
	start(t, "registry", "registry", env)
	env, _ = g.env(t, s.URL, accounts.RolePlanner, "planner-1")
	// One pipeline over both executors, so that both serve (and bill) the request.
	start(t, "planner", "planner", append(env, "TESSERA_PLANNER_SETTLE=200ms", "TESSERA_PLANNER_STRATEGY=exo"))
	env, _ = g.env(t, s.URL, accounts.RoleRouter, "router-1")
	router := start(t, "router", "router", append(env,
		"TESSERA_ROUTER_HTTP_ADDR=127.0.0.1:0", "TESSERA_ROUTER_ANONYMOUS_CUSTOMER=acme", "TESSERA_ROUTER_STAGE_TIMEOUT=5s",
		"TESSERA_ROUTER_CONSOLE_ADDR=127.0.0.1:0"))
	nodes := []string{"n1", "n2"}
	for _, n := range nodes {
		// The node's identity is its NATS user key: the .creds file holds
		// both, so heartbeats are signed with the key NATS authenticated.
		env, creds := g.env(t, s.URL, accounts.RoleExecutor, n)
		start(t, n, "executor", append(env,
			"TESSERA_EXECUTOR_IDENTITY_SEED="+creds, "TESSERA_EXECUTOR_STATE_DIR="+filepath.Join(g.dir, n),
			"TESSERA_EXECUTOR_SUPPLIER=supplier-a", "TESSERA_EXECUTOR_HEARTBEAT_INTERVAL=200ms",
			"TESSERA_EXECUTOR_THREADS=1", "TESSERA_EXECUTOR_MEMORY_BUDGET=64MiB"))
	}

	var addr string
	listening := regexp.MustCompile(`LISTENING (\S+)`)
	checkFor(t, 30*time.Second, 20*time.Millisecond, func() error {
		if router.exited() {
			t.Fatalf("router exited: %v", router.err)
		}
		m := listening.FindStringSubmatch(router.logText())
		if m == nil {
			return fmt.Errorf("router not listening yet")
		}
		addr = m[1]
		return nil
	})

	// HTTP, once the plan places the model on both executors.
	const maxTokens = 12
	var text string
	checkFor(t, 60*time.Second, 100*time.Millisecond, func() error {
		body := fmt.Sprintf(`{"model":%q,"prompt":%q,"max_tokens":%d,"temperature":0}`, testmodel.ID, testmodel.Prompt, maxTokens)
		resp, err := http.Post("http://"+addr+"/v1/completions", "application/json", strings.NewReader(body))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", resp.Status, b)
		}
		var out wire.CompletionResponse
		if err := json.Unmarshal(b, &out); err != nil || len(out.Choices) != 1 {
			return fmt.Errorf("response %s: %v", b, err)
		}
		text = out.Choices[0].Text
		return nil
	})
	if text == "" || !strings.HasPrefix(testmodel.GreedyText, text) {
		t.Fatalf("HTTP completion %q is not a prefix of the reference %q", text, testmodel.GreedyText)
	}

	// NATS, as customer acme, streamed into acme's inbox.
	acme := connect(t, "acme", g.natsConfig(t, s.URL, accounts.RoleCustomer, "acme"))
	chunks, err := acme.NC.SubscribeSync(acme.NC.NewInbox())
	if err != nil {
		t.Fatal(err)
	}
	msg := nats.NewMsg(subjects.Completions)
	msg.Header.Set("Tessera-Stream-Inbox", chunks.Subject)
	msg.Data, _ = json.Marshal(map[string]any{"model": testmodel.ID, "prompt": testmodel.Prompt, "max_tokens": maxTokens, "temperature": 0, "stream": true})
	reply, err := acme.NC.RequestMsg(msg, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var full wire.CompletionResponse
	if err := json.Unmarshal(reply.Data, &full); err != nil || len(full.Choices) != 1 || full.Choices[0].Text != text {
		t.Fatalf("NATS completion %s (%v), want text %q", reply.Data, err, text)
	}
	var streamed strings.Builder
	for {
		m, err := chunks.NextMsg(0)
		if err != nil {
			break
		}
		var c wire.CompletionResponse
		if err := json.Unmarshal(m.Data, &c); err != nil || len(c.Choices) != 1 {
			t.Fatalf("chunk %s: %v", m.Data, err)
		}
		streamed.WriteString(c.Choices[0].Text)
	}
	if streamed.String() != text {
		t.Fatalf("streamed %q, want %q", streamed.String(), text)
	}
	acme.noViolations(t)

	// Both executors' usage is in stream USAGE.
	st, err := admin.JS.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		checkFor(t, 20*time.Second, 50*time.Millisecond, func() error {
			m, err := st.GetLastMsgForSubject(ctx, subjects.UsageNode(n))
			if err != nil {
				return fmt.Errorf("usage of %s: %w", n, err)
			}
			if !bytes.Contains(m.Data, []byte(`"node":"`+n+`"`)) {
				return fmt.Errorf("usage of %s: %s", n, m.Data)
			}
			return nil
		})
	}
	// The console, under the router's credentials, follows the grid's
	// membership and plan events and asks settlement (absent here) for
	// its lag.
	console := regexp.MustCompile(`CONSOLE (\S+)`).FindStringSubmatch(router.logText())
	if console == nil {
		t.Fatal("router did not start its console")
	}
	checkFor(t, 20*time.Second, 100*time.Millisecond, func() error {
		resp, err := http.Get("http://" + console[1] + "/console/api/state")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var st struct {
			Nodes      []json.RawMessage      `json:"nodes"`
			Membership []wire.MembershipEvent `json:"membership"`
			PlanEvents []wire.PlanEvent       `json:"plan_events"`
			Settlement struct {
				OK    bool   `json:"ok"`
				Error string `json:"error"`
			} `json:"settlement"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			return err
		}
		if len(st.Nodes) != len(nodes) || len(st.Membership) < len(nodes) || len(st.PlanEvents) == 0 || st.Settlement.OK || st.Settlement.Error == "" {
			return fmt.Errorf("console: %d nodes, %d membership events, %d plan events, settlement %+v", len(st.Nodes), len(st.Membership), len(st.PlanEvents), st.Settlement)
		}
		return nil
	})
	if v := regexp.MustCompile(`.*Violation.*`).FindAllString(s.logText(), 5); len(v) > 0 {
		t.Fatalf("the server refused what a service did:\n%s", strings.Join(v, "\n"))
	}
}
