package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/testmodel"
	"github.com/tessera-grid/tessera/pkg/wire"
	"github.com/tessera-grid/tessera/services/settlement"
)

// repoRoot is the repository root (the e2e package's parent).
func repoRoot(t testing.TB) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Dir(wd)
}

// buildBinaries builds nats-server, every service and the CLI into dir.
func buildBinaries(t *testing.T, dir string) {
	t.Helper()
	root := repoRoot(t)
	builds := [][2]string{
		{root, "github.com/nats-io/nats-server/v2"},
		{root, "./cmd/tessera"},
	}
	for _, s := range []string{"registry", "planner", "router", "executor", "settlement"} {
		builds = append(builds, [2]string{filepath.Join(root, "services", s), "./cmd/tessera-" + s})
	}
	for _, b := range builds {
		cmd := exec.Command("go", "build", "-o", dir+"/", b[1])
		cmd.Dir = b[0]
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", b[1], err, out)
		}
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// proc is a child process whose output is kept for failure reports.
type proc struct {
	name string
	cmd  *exec.Cmd
	mu   sync.Mutex
	out  []string
	done chan struct{}
}

func (p *proc) tail() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	from := max(0, len(p.out)-30)
	return strings.Join(p.out[from:], "\n")
}

// startProc starts bin with env and kills it when the test ends.
func startProc(t *testing.T, name, bin string, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = repoRoot(t)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			p.mu.Lock()
			p.out = append(p.out, sc.Text())
			p.mu.Unlock()
		}
	}()
	go func() {
		_ = cmd.Wait()
		pw.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("--- %s output (tail):\n%s", name, p.tail())
		}
	})
	return p
}

// startClickHouse starts a project-local ClickHouse server for the test.
func startClickHouse(t *testing.T) string {
	t.Helper()
	root := repoRoot(t)
	if out, err := exec.Command(filepath.Join(root, "scripts/clickhouse.sh"), "ensure").CombinedOutput(); err != nil {
		t.Skipf("ClickHouse is not installed (run scripts/clickhouse.sh ensure as root): %v\n%s", err, out)
	}
	// A port found free may be taken by the time the server binds it (other
	// tests run beside this one): try again on other ports.
	var out []byte
	for range 3 {
		dir := t.TempDir()
		port := freePort(t)
		start := exec.Command(filepath.Join(root, "scripts/clickhouse.sh"), "start", dir, fmt.Sprint(port))
		var err error
		if out, err = start.CombinedOutput(); err == nil {
			t.Cleanup(func() { _ = exec.Command(filepath.Join(root, "scripts/clickhouse.sh"), "stop", dir).Run() })
			return fmt.Sprintf("127.0.0.1:%d", port)
		}
		_ = exec.Command(filepath.Join(root, "scripts/clickhouse.sh"), "stop", dir).Run()
	}
	t.Fatalf("clickhouse start failed three times; last output:\n%s", out)
	return ""
}

// The five services and three executors as separate OS processes against
// a separate nats-server give the reference completion, and settlement
// stores one usage row per executor of the request.
func TestSeparateProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs nine processes")
	}
	bin := t.TempDir()
	buildBinaries(t, bin)
	chAddr := startClickHouse(t)
	natsPort := freePort(t)
	startProc(t, "nats-server", bin+"/nats-server", nil, "-js", "-a", "127.0.0.1", "-p", fmt.Sprint(natsPort), "-sd", t.TempDir())
	natsURL := fmt.Sprintf("nats://127.0.0.1:%d", natsPort)
	bustest.CheckFor(t, 10*time.Second, 50*time.Millisecond, func() error {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", natsPort))
		if err == nil {
			c.Close()
		}
		return err
	})
	httpPort := freePort(t)
	common := []string{"NATS_URL=" + natsURL, "TESSERA_LOG_LEVEL=info"}
	env := func(extra ...string) []string { return append(append([]string{}, common...), extra...) }
	startProc(t, "registry", bin+"/tessera-registry", env())
	// One pipeline over the three executors, each holding different layers.
	startProc(t, "planner", bin+"/tessera-planner", env("TESSERA_PLANNER_SETTLE=300ms", "TESSERA_PLANNER_STRATEGY=exo"))
	startProc(t, "settlement", bin+"/tessera-settlement", env("TESSERA_SETTLEMENT_CLICKHOUSE_ADDR="+chAddr, "TESSERA_SETTLEMENT_CLICKHOUSE_DATABASE=tessera_e2e"))
	startProc(t, "router", bin+"/tessera-router", env(fmt.Sprintf("TESSERA_ROUTER_HTTP_ADDR=127.0.0.1:%d", httpPort), "TESSERA_ROUTER_ANONYMOUS_CUSTOMER=acme"))
	for i := 1; i <= 3; i++ {
		startProc(t, fmt.Sprintf("exec-%d", i), bin+"/tessera-executor", env(
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
