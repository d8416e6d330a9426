// Package proctest runs the grid's programs as separate OS processes for
// end-to-end tests: it builds the binaries, starts, stops, kills and
// restarts processes with their output kept in a log file, finds free
// loopback ports, copies the shipped NATS configuration with local edits,
// and starts a project-local ClickHouse server.
package proctest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RepoRoot is the repository root: the nearest directory above the test's
// working directory that holds go.work.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.work")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			t.Fatalf("no go.work above %s", dir)
		}
	}
}

// Services lists the services, each built as bin/tessera-<service>.
var Services = []string{"registry", "planner", "router", "executor", "settlement"}

// Build builds nats-server, every service and the tessera CLI into dir.
func Build(t testing.TB, dir string) {
	t.Helper()
	root := RepoRoot(t)
	builds := [][2]string{
		{root, "github.com/nats-io/nats-server/v2"},
		{root, "./cmd/tessera"},
	}
	for _, s := range Services {
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

// Localise copies deploy/nats/<src> to dst, replacing each old string of
// edits by its new one, as an operator edits host names, ports and paths
// for the machines at hand. Every old string must occur: a test that stops
// matching the shipped file fails instead of testing something else.
func Localise(t testing.TB, src, dst string, edits ...string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(RepoRoot(t), "deploy", "nats", src))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for i := 0; i+1 < len(edits); i += 2 {
		if !strings.Contains(s, edits[i]) {
			t.Fatalf("%s no longer contains %q", src, edits[i])
		}
		s = strings.ReplaceAll(s, edits[i], edits[i+1])
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// FreePorts returns n distinct free loopback ports (held open together, so
// that they differ, then released).
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// FreePort returns one free loopback port.
func FreePort(t testing.TB) int { return FreePorts(t, 1)[0] }

// Proc is a program run as a child process; its output goes to a log file
// that outlives restarts.
type Proc struct {
	t    testing.TB
	name string
	bin  string
	env  []string
	args []string
	log  string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Start runs bin with env added to the test process's environment, from
// the repository root. The process is stopped when the test ends; if the
// test failed, the end of its log is printed.
func Start(t testing.TB, name, bin string, env []string, args ...string) *Proc {
	t.Helper()
	p := &Proc{t: t, name: name, bin: bin, env: env, args: args, log: filepath.Join(t.TempDir(), name+".log")}
	if err := p.start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("--- %s log (tail):\n%s", name, p.Tail(40))
		}
		KeepLog(t, name, p.log)
	})
	return p
}

// KeepLog copies a process's log file into TESSERA_TEST_LOG_DIR, when set,
// as <test>-<name>.log, for a look after the run.
func KeepLog(t testing.TB, name, path string) {
	if dir := os.Getenv("TESSERA_TEST_LOG_DIR"); dir != "" {
		if b, err := os.ReadFile(path); err == nil {
			_ = os.WriteFile(filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_")+"-"+name+".log"), b, 0o644)
		}
	}
}

func (p *Proc) start() error {
	f, err := os.OpenFile(p.log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Dir = RepoRoot(p.t)
	cmd.Stdout, cmd.Stderr = f, f
	// A test binary killed abruptly takes its children along.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return err
	}
	done := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.done, p.err = cmd, done, nil
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		f.Close()
		p.mu.Lock()
		p.err = err
		p.mu.Unlock()
		close(done)
	}()
	return nil
}

func (p *Proc) current() (*exec.Cmd, chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd, p.done
}

// Name is the name the process was started under.
func (p *Proc) Name() string { return p.name }

// PID is the process id of the current run.
func (p *Proc) PID() int {
	cmd, _ := p.current()
	return cmd.Process.Pid
}

// Kill ends the process at once (SIGKILL), as a crash would, and waits
// for it to be gone.
func (p *Proc) Kill() {
	cmd, done := p.current()
	_ = cmd.Process.Kill()
	<-done
}

// Stop asks the process to end (SIGTERM) and kills it after 20 seconds.
func (p *Proc) Stop() {
	cmd, done := p.current()
	select {
	case <-done:
		return
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		p.Kill()
	}
}

// Restart starts the program again, with the same environment and
// arguments, after it has ended.
func (p *Proc) Restart() {
	p.t.Helper()
	if !p.Exited() {
		p.t.Fatalf("restart %s: it still runs", p.name)
	}
	p.appendLog(fmt.Sprintf("\n==== restarted at %s ====\n", time.Now().Format(time.RFC3339Nano)))
	if err := p.start(); err != nil {
		p.t.Fatalf("restart %s: %v", p.name, err)
	}
}

func (p *Proc) appendLog(s string) {
	if f, err := os.OpenFile(p.log, os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
		_, _ = f.WriteString(s)
		f.Close()
	}
}

// Exited reports whether the current run has ended.
func (p *Proc) Exited() bool {
	_, done := p.current()
	select {
	case <-done:
		return true
	default:
		return false
	}
}

// Err is how the last run ended (nil while it runs or after a clean exit).
func (p *Proc) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Log returns everything the process has written, across restarts.
func (p *Proc) Log() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// Tail returns the last n lines of the log.
func (p *Proc) Tail(n int) string {
	lines := strings.Split(strings.TrimRight(p.Log(), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// ClickHouse starts a project-local ClickHouse server for the test (see
// scripts/clickhouse.sh) and returns its native-protocol address. It skips
// the test when ClickHouse is not installed.
func ClickHouse(t testing.TB) string {
	t.Helper()
	script := filepath.Join(RepoRoot(t), "scripts/clickhouse.sh")
	if out, err := exec.Command(script, "ensure").CombinedOutput(); err != nil {
		t.Skipf("ClickHouse is not installed (run scripts/clickhouse.sh ensure as root): %v\n%s", err, out)
	}
	// A port found free may be taken by the time the server binds it (other
	// tests run beside this one): try again on other ports.
	var out []byte
	for range 3 {
		dir := t.TempDir()
		port := FreePort(t)
		var err error
		if out, err = exec.Command(script, "start", dir, fmt.Sprint(port)).CombinedOutput(); err == nil {
			t.Cleanup(func() { _ = exec.Command(script, "stop", dir).Run() })
			return fmt.Sprintf("127.0.0.1:%d", port)
		}
		_ = exec.Command(script, "stop", dir).Run()
	}
	t.Fatalf("clickhouse start failed three times; last output:\n%s", out)
	return ""
}

// ClickHouseInstalled reports whether a ClickHouse server binary exists.
func ClickHouseInstalled(t testing.TB) bool {
	t.Helper()
	return exec.Command(filepath.Join(RepoRoot(t), "scripts/clickhouse.sh"), "binary").Run() == nil
}
