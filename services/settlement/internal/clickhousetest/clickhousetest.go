// Package clickhousetest runs a real ClickHouse server for tests: one per
// test binary (see Main), with its data in a temporary directory and its
// configuration written by scripts/clickhouse.sh, so that tests and
// developers run the same server setup. Each test gets its own database.
//
// When the clickhouse-server binary is absent the tests that need it skip
// with a message saying how to install it, unless TESSERA_REQUIRE_CLICKHOUSE
// is set (CI sets it), which turns the skip into a failure.
package clickhousetest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// EnvRequire names the variable that, when set, makes a missing server binary
// fail the tests instead of skipping them.
const EnvRequire = "TESSERA_REQUIRE_CLICKHOUSE"

// ErrNoBinary means clickhouse-server is not installed.
var ErrNoBinary = errors.New("clickhouse-server not installed (install it with: sudo scripts/clickhouse.sh ensure)")

// Server is a ClickHouse server that this process started and owns: it dies
// with the process even when a test binary is killed.
type Server struct {
	// Dir holds the server's configuration, data and logs.
	Dir string
	// Port is the native-protocol port; HTTPPort the HTTP port.
	Port, HTTPPort int

	mu    sync.Mutex
	cmd   *exec.Cmd
	done  chan struct{}
	conn  driver.Conn
	dbSeq atomic.Int64
}

// Binary returns the command that runs the server: Debian's
// clickhouse-server (in /usr/sbin, not always on PATH) or the single
// `clickhouse` binary of current releases.
func Binary() ([]string, error) {
	if p, err := exec.LookPath("clickhouse-server"); err == nil {
		return []string{p}, nil
	}
	for _, p := range []string{"/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"} {
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return []string{p}, nil
		}
	}
	if p, err := exec.LookPath("clickhouse"); err == nil {
		return []string{p, "server"}, nil
	}
	return nil, ErrNoBinary
}

// script finds scripts/clickhouse.sh by walking up from the working
// directory (tests run in their package directory inside the repository).
func script() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		p := filepath.Join(dir, "scripts", "clickhouse.sh")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("scripts/clickhouse.sh not found above the working directory")
		}
		dir = parent
	}
}

// freePorts asks the kernel for n distinct free ports.
func freePorts(n int) ([]int, error) {
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Start starts a server with its data in dir on free ports and waits until
// it answers.
func Start(dir string) (*Server, error) {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		var ports []int
		ports, err = freePorts(2)
		if err != nil {
			return nil, err
		}
		s := &Server{Dir: dir, Port: ports[0], HTTPPort: ports[1]}
		if err = s.start(); err == nil {
			return s, nil
		}
		// Another process may have taken a port between the probe and the
		// server's bind; try other ports.
	}
	return nil, err
}

func (s *Server) start() error {
	bin, err := Binary()
	if err != nil {
		return err
	}
	sh, err := script()
	if err != nil {
		return err
	}
	cfg := exec.Command("bash", sh, "config", s.Dir, fmt.Sprint(s.Port), fmt.Sprint(s.HTTPPort))
	if out, err := cfg.CombinedOutput(); err != nil {
		return fmt.Errorf("clickhouse.sh config: %w: %s", err, out)
	}
	logf, err := os.OpenFile(filepath.Join(s.Dir, "log", "stdout.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bin[0], append(bin[1:], "--config-file="+filepath.Join(s.Dir, "config.xml"))...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// The server must not outlive the test binary, even when it is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", bin[0], err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if s.ping() {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("clickhouse-server exited during start: %s", s.logTail())
		case <-time.After(50 * time.Millisecond):
		}
	}
	_ = s.Kill()
	return fmt.Errorf("clickhouse-server did not answer within 30s: %s", s.logTail())
}

func (s *Server) ping() bool {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/ping", s.HTTPPort))
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode == http.StatusOK && strings.HasPrefix(string(b), "Ok.")
}

func (s *Server) logTail() string {
	var b strings.Builder
	for _, name := range []string{"error.log", "stdout.log"} {
		data, _ := os.ReadFile(filepath.Join(s.Dir, "log", name))
		if len(data) > 2000 {
			data = data[len(data)-2000:]
		}
		fmt.Fprintf(&b, "[%s] %s ", name, data)
	}
	return b.String()
}

// Addr is the native-protocol address, host:port.
func (s *Server) Addr() string { return fmt.Sprintf("127.0.0.1:%d", s.Port) }

// Stop shuts the server down gracefully.
func (s *Server) Stop() error { return s.signal(syscall.SIGTERM, 30*time.Second) }

// Kill kills the server at once, as a crash would.
func (s *Server) Kill() error { return s.signal(syscall.SIGKILL, 10*time.Second) }

func (s *Server) signal(sig syscall.Signal, wait time.Duration) error {
	s.mu.Lock()
	cmd, done, conn := s.cmd, s.done, s.conn
	s.cmd, s.conn = nil, nil
	s.mu.Unlock()
	if conn != nil {
		_ = conn.Close()
	}
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
		return nil
	case <-time.After(wait):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("clickhouse-server ignored %v for %v; killed", sig, wait)
	}
}

// Restart starts the server again on the same directory and ports, after
// Stop or Kill.
func (s *Server) Restart() error { return s.start() }

// Conn returns a connection (pool) to the server's default database.
func (s *Server) Conn() (driver.Conn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		return s.conn, nil
	}
	c, err := clickhouse.Open(&clickhouse.Options{Addr: []string{s.Addr()}, Auth: clickhouse.Auth{Database: "default", Username: "default"}})
	if err != nil {
		return nil, err
	}
	s.conn = c
	return c, nil
}

// Database creates a fresh, empty database for t and drops it when t ends.
func (s *Server) Database(t testing.TB) string {
	t.Helper()
	name := "t"
	for _, r := range strings.ToLower(t.Name()) {
		if len(name) > 40 {
			break
		}
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			name += string(r)
		} else {
			name += "_"
		}
	}
	name = fmt.Sprintf("%s_%d", name, s.dbSeq.Add(1))
	c, err := s.Conn()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := c.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		if c, err := s.Conn(); err == nil {
			_ = c.Exec(context.Background(), "DROP DATABASE IF EXISTS "+name)
		}
	})
	return name
}

// Main runs a test binary's tests with one server shared by all of them: call
// it from TestMain and hand srv to Require in each test. When the binary is
// absent, srv stays nil (unless EnvRequire is set, then Main fails).
func Main(m *testing.M, srv **Server) int {
	if _, err := Binary(); err != nil {
		if os.Getenv(EnvRequire) != "" {
			fmt.Fprintf(os.Stderr, "clickhousetest: %v, and %s is set\n", err, EnvRequire)
			return 1
		}
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "tessera-clickhouse-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "clickhousetest:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	s, err := Start(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "clickhousetest:", err)
		return 1
	}
	*srv = s
	code := m.Run()
	// The data is thrown away: no need to wait for a graceful shutdown.
	if err := s.Kill(); err != nil {
		fmt.Fprintln(os.Stderr, "clickhousetest:", err)
	}
	return code
}

// Require returns srv, or skips t when Main found no server binary.
func Require(t testing.TB, srv *Server) *Server {
	t.Helper()
	if srv == nil {
		if _, err := Binary(); err != nil {
			t.Skipf("real ClickHouse needed: %v", err)
		}
		t.Fatal("clickhousetest: no server; call clickhousetest.Main from TestMain")
	}
	return srv
}

// StartOwn starts a server only t uses (for tests that kill or restart it),
// stopped when t ends; it skips t like Require when the binary is absent.
func StartOwn(t testing.TB) *Server {
	t.Helper()
	if _, err := Binary(); err != nil {
		if os.Getenv(EnvRequire) != "" {
			t.Fatalf("%v, and %s is set", err, EnvRequire)
		}
		t.Skipf("real ClickHouse needed: %v", err)
	}
	s, err := Start(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Kill() })
	return s
}
