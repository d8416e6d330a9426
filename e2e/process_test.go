package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/internal/proctest"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
)

// The five services and three executors as separate OS processes against
// a separate nats-server give the reference completion, and settlement
// stores one usage row per executor of the request.
func TestSeparateProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs nine processes")
	}
	bin := t.TempDir()
	proctest.Build(t, bin)
	chAddr := proctest.ClickHouse(t)
	natsPort := proctest.FreePort(t)
	proctest.Start(t, "nats-server", bin+"/nats-server", nil, "-js", "-a", "127.0.0.1", "-p", fmt.Sprint(natsPort), "-sd", t.TempDir())
	natsURL := fmt.Sprintf("nats://127.0.0.1:%d", natsPort)
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", natsPort))
		if err == nil {
			c.Close()
		}
		return err
	})
	httpPort := proctest.FreePort(t)
	common := []string{"NATS_URL=" + natsURL, "TESSERA_LOG_LEVEL=info"}
	env := func(extra ...string) []string { return append(append([]string{}, common...), extra...) }
	proctest.Start(t, "registry", bin+"/tessera-registry", env())
	// One pipeline over the three executors, each holding different layers.
	proctest.Start(t, "planner", bin+"/tessera-planner", env("TESSERA_PLANNER_SETTLE=300ms", "TESSERA_PLANNER_STRATEGY=exo"))
	proctest.Start(t, "settlement", bin+"/tessera-settlement", env("TESSERA_SETTLEMENT_CLICKHOUSE_ADDR="+chAddr, "TESSERA_SETTLEMENT_CLICKHOUSE_DATABASE=tessera_e2e"))
	proctest.Start(t, "router", bin+"/tessera-router", env(fmt.Sprintf("TESSERA_ROUTER_HTTP_ADDR=127.0.0.1:%d", httpPort), "TESSERA_ROUTER_ANONYMOUS_CUSTOMER=acme"))
	for i := 1; i <= 3; i++ {
		proctest.Start(t, fmt.Sprintf("exec-%d", i), bin+"/tessera-executor", env(
			fmt.Sprintf("TESSERA_EXECUTOR_NODE_ID=exec-%d", i),
			"TESSERA_EXECUTOR_STATE_DIR="+t.TempDir(),
			"TESSERA_EXECUTOR_HEARTBEAT_INTERVAL=300ms",
			"TESSERA_EXECUTOR_THREADS=1"))
	}
	cp, tp, err := testmodel.Paths()
	if err != nil {
		t.Fatal(err)
	}
	imp := exec.Command(bin+"/tessera", "model", "import", "--id", testmodel.ID, "--tokenizer", tp, cp)
	imp.Env = env()
	// The services create the streams and buckets as they start.
	bustest.CheckFor(t, 30*time.Second, 200*time.Millisecond, func() error {
		if out, err := imp.CombinedOutput(); err != nil {
			imp = exec.Command(imp.Path, imp.Args[1:]...)
			imp.Env = env()
			return fmt.Errorf("import: %v: %s", err, out)
		}
		return nil
	})
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/completions", httpPort)
	var res wire.CompletionResponse
	bustest.CheckFor(t, time.Minute, 300*time.Millisecond, func() error {
		resp, err := http.Post(url, "application/json", strings.NewReader(`{"model":"stories260k","prompt":"Once upon a time","max_tokens":60,"temperature":0}`))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("HTTP %d: %s", resp.StatusCode, b)
		}
		return json.Unmarshal(b, &res)
	})
	if got := res.Choices[0].Text; got != testmodel.GreedyText {
		t.Fatalf("text %q\nwant %q", got, testmodel.GreedyText)
	}
	for i, id := range res.Tokens {
		if id != testmodel.GreedyIDs[i] {
			t.Fatalf("token %d: %d, want %d", i, id, testmodel.GreedyIDs[i])
		}
	}
	// One usage row per executor on the route, read back from ClickHouse.
	var cfg settlement.Config
	cfg.ClickHouseAddr, cfg.ClickHouseDatabase, cfg.ClickHouseUser = []string{chAddr}, "tessera_e2e", "default"
	bustest.CheckFor(t, 30*time.Second, 200*time.Millisecond, func() error {
		rows, err := settlement.RequestUsage(context.Background(), cfg, res.ID)
		if err != nil {
			return err
		}
		if len(rows) != 3 {
			return fmt.Errorf("%d usage rows for %s, want 3", len(rows), res.ID)
		}
		return nil
	})
}
