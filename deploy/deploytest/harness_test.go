// Package deploytest runs what deploy/ ships: nats-server processes started
// from deploy/nats with the accounts tessera-accounts renders, and the
// services as separate processes with their own credentials. The test binary
// plays every program: started with TESSERA_DEPLOYTEST_RUN set, it runs that
// program's main (nats-server's, or a service's through pkg/svc, exactly as
// services/*/cmd do) instead of the tests.
package deploytest

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/tessera-grid/tessera/deploy/accounts"
	"github.com/tessera-grid/tessera/internal/proctest"
	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/svc"
	"github.com/tessera-grid/tessera/services/executor"
	"github.com/tessera-grid/tessera/services/planner"
	"github.com/tessera-grid/tessera/services/registry"
	"github.com/tessera-grid/tessera/services/router"
)

// runEnv names the program a re-executed test binary runs.
const runEnv = "TESSERA_DEPLOYTEST_RUN"

func TestMain(m *testing.M) {
	switch prog := os.Getenv(runEnv); prog {
	case "":
		os.Exit(m.Run())
	case "nats-server":
		natsServerMain(os.Args[1:])
	case "registry":
		var cfg registry.Config
		svc.Main("registry", registry.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
			return registry.Run(ctx, cfg, registry.Deps{Bus: c, Log: log})
		})
	case "planner":
		var cfg planner.Config
		svc.Main("planner", planner.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
			return planner.Run(ctx, cfg, planner.Deps{Bus: c, Log: log})
		})
	case "router":
		var cfg router.Config
		svc.Main("router", router.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
			return router.Run(ctx, cfg, router.Deps{Bus: c, Log: log, Listening: func(addr string) {
				// The test reads the router's addresses from its log.
				fmt.Fprintf(os.Stderr, "LISTENING %s\n", addr)
			}, ConsoleListening: func(addr string) {
				fmt.Fprintf(os.Stderr, "CONSOLE %s\n", addr)
			}})
		})
	case "executor":
		var cfg executor.Config
		svc.Main("executor", executor.EnvPrefix, &cfg, func(ctx context.Context, c *bus.Conn, log *slog.Logger) error {
			return executor.Run(ctx, cfg, executor.Deps{Bus: c, Log: log})
		})
	default:
		fmt.Fprintf(os.Stderr, "%s=%q: unknown program\n", runEnv, prog)
		os.Exit(2)
	}
}

// natsServerMain is nats-server's main: flags and configuration file,
// logging, signals, run until shut down.
func natsServerMain(args []string) {
	fs := flag.NewFlagSet("nats-server", flag.ExitOnError)
	opts, err := server.ConfigureOptions(fs, args, server.PrintServerAndExit, fs.Usage, server.PrintTLSHelpAndDie)
	if err != nil {
		server.PrintAndDie("nats-server: " + err.Error())
	}
	s, err := server.NewServer(opts)
	if err != nil {
		server.PrintAndDie("nats-server: " + err.Error())
	}
	s.ConfigureLogger()
	if err := server.Run(s); err != nil {
		server.PrintAndDie(err.Error())
	}
	s.WaitForShutdown()
	os.Exit(0)
}

// process is a program started by a test, stopped when the test ends.
type process struct {
	t    testing.TB
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

// start runs prog (see TestMain) with env added to a minimal environment.
func start(t testing.TB, name, prog string, env []string, args ...string) *process {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append([]string{runEnv + "=" + prog, "PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "TMPDIR=" + os.TempDir()}, env...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatal(err)
	}
	p := &process{t: t, name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("--- %s log (last lines) ---\n%s", name, p.tail(40))
		}
		proctest.KeepLog(t, name, p.log)
	})
	return p
}

// stop asks the process to end (SIGTERM) and kills it after 10s.
func (p *process) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.kill()
	}
}

// kill ends the process at once (SIGKILL), as a crash would.
func (p *process) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// exited reports whether the process has ended.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// logText returns what the process has written so far.
func (p *process) logText() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

func (p *process) tail(n int) string {
	lines := strings.Split(strings.TrimRight(p.logText(), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// freePorts returns n distinct free loopback ports.
func freePorts(t testing.TB, n int) []int { return proctest.FreePorts(t, n) }

// checkFor calls f every interval until it returns nil or timeout passes,
// then fails the test with f's last error.
func checkFor(t testing.TB, timeout, interval time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %v: %v", timeout, err)
		}
		time.Sleep(interval)
	}
}

// natsServer is a nats-server process.
type natsServer struct {
	*process
	// URL is the client URL on loopback.
	URL string
	// Name is its server_name.
	Name string
}

// startNATS starts nats-server with configuration file conf.
func startNATS(t testing.TB, name, conf string, port int) *natsServer {
	t.Helper()
	p := start(t, name, "nats-server", nil, "-c", conf)
	return &natsServer{process: p, URL: fmt.Sprintf("nats://127.0.0.1:%d", port), Name: name}
}

// waitReady waits until the server accepts TCP connections.
func (s *natsServer) waitReady(t testing.TB) {
	t.Helper()
	checkFor(t, 20*time.Second, 20*time.Millisecond, func() error {
		if s.exited() {
			t.Fatalf("%s exited: %v\n%s", s.name, s.err, s.tail(20))
		}
		c, err := net.DialTimeout("tcp", strings.TrimPrefix(s.URL, "nats://"), time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
}

// grid is a secured NATS system made the way deploy/README.md says.
type grid struct {
	dir     string
	secrets *accounts.Secrets
	// confDir holds the localised server configuration and accounts.conf.
	confDir string
}

// newGrid runs the walkthrough's credential steps in a temporary directory:
// tessera-accounts init and server-config.
func newGrid(t testing.TB) *grid {
	t.Helper()
	dir := t.TempDir()
	g := &grid{dir: dir, confDir: filepath.Join(dir, "nats")}
	if err := os.MkdirAll(g.confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	secrets := filepath.Join(dir, "secrets")
	tool(t, "-dir", secrets, "init")
	tool(t, "-dir", secrets, "server-config", "-o", filepath.Join(g.confDir, "accounts.conf"))
	s, err := accounts.Open(secrets)
	if err != nil {
		t.Fatal(err)
	}
	g.secrets = s
	return g
}

// tool runs tessera-accounts with args.
func tool(t testing.TB, args ...string) string {
	t.Helper()
	var out strings.Builder
	if err := accounts.Command(context.Background(), args, &out); err != nil {
		t.Fatalf("tessera-accounts %s: %v", strings.Join(args, " "), err)
	}
	return out.String()
}

// issue issues credentials for role and name and returns their .creds path.
func (g *grid) issue(t testing.TB, role accounts.Role, name string) string {
	t.Helper()
	out, err := g.secrets.Issue(accounts.Identity{Role: role, Name: name})
	if err != nil {
		t.Fatal(err)
	}
	return out.Creds
}

// natsConfig is the config.NATS an identity of role and name uses on url.
func (g *grid) natsConfig(t testing.TB, url string, role accounts.Role, name string) config.NATS {
	t.Helper()
	return config.NATS{URL: url, Creds: g.issue(t, role, name), InboxPrefix: accounts.InboxPrefix(role, name), Replicas: 1}
}

// env is the process environment of a service of role and name on url: the
// lines of the environment file tessera-accounts wrote, with the .creds
// path where the test keeps it (also returned).
func (g *grid) env(t testing.TB, url string, role accounts.Role, name string) (env []string, creds string) {
	t.Helper()
	creds = g.issue(t, role, name)
	env = []string{"NATS_URL=" + url, "TESSERA_LOG_LEVEL=debug", "OTEL_TRACES_EXPORTER=none", "OTEL_METRICS_EXPORTER=none"}
	sc := bufio.NewScanner(strings.NewReader(accounts.EnvFile(role, name)))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "#") || line == "":
		case strings.HasPrefix(line, "NATS_CREDS="):
			env = append(env, "NATS_CREDS="+creds)
		default:
			env = append(env, line)
		}
	}
	return env, creds
}

// client is a connection of one identity that records the server's
// asynchronous errors (permission violations).
type client struct {
	*bus.Conn
	name string

	mu   sync.Mutex
	errs []string
}

// connect connects as the identity of cfg.
func connect(t testing.TB, name string, cfg config.NATS) *client {
	t.Helper()
	c := &client{name: name}
	conn, err := bus.Connect(context.Background(), cfg, nil, name, nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		c.mu.Lock()
		c.errs = append(c.errs, err.Error())
		c.mu.Unlock()
	}))
	if err != nil {
		t.Fatalf("connect %s: %v", name, err)
	}
	c.Conn = conn
	t.Cleanup(conn.NC.Close)
	return c
}

// violation waits for the server to report a permissions violation of kind
// ("Publish" or "Subscription") on subject to c.
func (c *client) violation(t testing.TB, kind, subject string) {
	t.Helper()
	want := fmt.Sprintf("Permissions Violation for %s to %q", kind, subject)
	checkFor(t, 5*time.Second, 5*time.Millisecond, func() error {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, e := range c.errs {
			if strings.Contains(e, want) {
				return nil
			}
		}
		return fmt.Errorf("%s: no %q among %q", c.name, want, c.errs)
	})
}

// noViolations fails if the server reported any error to c.
func (c *client) noViolations(t testing.TB) {
	t.Helper()
	if err := c.NC.Flush(); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.errs) > 0 {
		t.Fatalf("%s: server reported %q", c.name, c.errs)
	}
}
