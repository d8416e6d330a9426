// Command registry-bench simulates thousands of executors heartbeating at
// 1 Hz against one registry process and reports whether the registry keeps
// up: its CPU and memory (read from /proc, so the simulator's own work is
// not counted), the time from a node's first heartbeat to its record in KV
// nodes, the time from a node's last heartbeat to its "left" event, and the
// growth of the heartbeat backlog over the measurement window.
//
// It starts a NATS server (itself, with -role nats) and the registry binary
// named by -registry as child processes. Heartbeats are signed before the
// clock starts, so that the simulator spends its time publishing; the
// registry verifies every one. scripts/bench-registry.sh builds and runs it.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/tessera-grid/tessera/pkg/benchfig"
	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/config"
	"github.com/tessera-grid/tessera/pkg/nodesig"
	"github.com/tessera-grid/tessera/pkg/subjects"
	"github.com/tessera-grid/tessera/pkg/wire"
)

func main() {
	var o options
	flag.StringVar(&o.role, "role", "", `"nats" runs the NATS server child; empty runs the benchmark`)
	flag.IntVar(&o.port, "port", 0, "NATS port (role nats)")
	flag.StringVar(&o.store, "store", "", "JetStream store directory (role nats)")
	flag.StringVar(&o.registry, "registry", "", "path of the tessera-registry binary")
	flag.IntVar(&o.nodes, "nodes", 10000, "simulated executors")
	flag.IntVar(&o.conns, "conns", 8, "NATS connections the executors share")
	flag.DurationVar(&o.interval, "interval", time.Second, "heartbeat interval")
	flag.DurationVar(&o.warmup, "warmup", 10*time.Second, "time for every node to join before measuring")
	flag.DurationVar(&o.window, "window", 30*time.Second, "measurement window")
	flag.IntVar(&o.stop, "stop", 1000, "nodes stopped after the window (stop-to-left is measured on them)")
	flag.StringVar(&o.prefix, "prefix", "registry_10k", "prefix of the recorded figures")
	flag.Parse()
	if o.role == "nats" {
		runNATS(o)
		return
	}
	if err := run(o); err != nil {
		log.Fatal(err)
	}
}

type options struct {
	role, store, registry, prefix string
	port, nodes, conns, stop      int
	interval, warmup, window      time.Duration
}

// runNATS serves an embedded NATS server until SIGTERM.
func runNATS(o options) {
	s, err := bus.StartEmbedded(bus.EmbedOptions{StoreDir: o.store, Port: o.port, Name: "bench"})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	<-ctx.Done()
	s.Shutdown()
	s.WaitForShutdown()
}

// simNode is one simulated executor with its heartbeats signed in advance.
type simNode struct {
	id    string
	phase time.Duration
	beats [][]byte
	// first and last are when its first and last heartbeat were sent.
	first, last atomic.Int64
}

func run(o options) error {
	if o.registry == "" {
		return fmt.Errorf("-registry is required (build services/registry/cmd/tessera-registry)")
	}
	dir, err := os.MkdirTemp("", "registry-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	port, err := freePort()
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	natsProc := exec.Command(self, "-role", "nats", "-port", strconv.Itoa(port), "-store", filepath.Join(dir, "nats"))
	natsProc.Stderr = os.Stderr
	if err := natsProc.Start(); err != nil {
		return err
	}
	defer stopProc(natsProc)
	ctx := context.Background()
	admin, err := connectRetry(ctx, url, "bench-admin")
	if err != nil {
		return err
	}
	defer admin.Close()
	if err := bus.Bootstrap(ctx, admin.JS, 1); err != nil {
		return err
	}

	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	reg := exec.Command(o.registry)
	reg.Env = append(os.Environ(), "NATS_URL="+url, "TESSERA_LOG_LEVEL=warn", "TESSERA_REGISTRY_CHALLENGE_EVERY=-1s", "GOMAXPROCS="+strconv.Itoa(runtime.NumCPU()))
	reg.Stdout, reg.Stderr = logf, logf
	if err := reg.Start(); err != nil {
		return err
	}
	defer stopProc(reg)
	if err := waitStats(admin.NC); err != nil {
		return err
	}

	log.Printf("signing %d nodes × %d heartbeats", o.nodes, beatsFor(o))
	nodes, err := presign(o)
	if err != nil {
		return err
	}

	// Watch for records (join to visible) and left events (stop to left).
	visible := map[string]time.Time{}
	left := map[string]time.Time{}
	var mu sync.Mutex
	kv, err := admin.JS.KeyValue(ctx, subjects.BucketNodes)
	if err != nil {
		return err
	}
	w, err := kv.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		return err
	}
	defer w.Stop()
	go func() {
		for e := range w.Updates() {
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			now := time.Now()
			mu.Lock()
			if _, ok := visible[e.Key()]; !ok {
				visible[e.Key()] = now
			}
			mu.Unlock()
		}
	}()
	evSub, err := admin.NC.Subscribe(subjects.MembershipAll, func(m *nats.Msg) {
		if !strings.HasSuffix(m.Subject, "."+wire.MemberLeft) {
			return
		}
		now := time.Now()
		var ev wire.MembershipEvent
		if json.Unmarshal(m.Data, &ev) == nil {
			mu.Lock()
			left[ev.Node] = now
			mu.Unlock()
		}
	})
	if err != nil {
		return err
	}
	_ = evSub.SetPendingLimits(-1, -1)

	// Publish.
	conns := make([]*nats.Conn, o.conns)
	for i := range conns {
		c, err := nats.Connect(url, nats.Name(fmt.Sprintf("bench-sim-%d", i)))
		if err != nil {
			return err
		}
		defer c.Close()
		conns[i] = c
	}
	stopAt := int((o.warmup + o.window) / o.interval)
	stopped := map[string]bool{}
	for _, i := range rand.Perm(len(nodes))[:min(o.stop, len(nodes))] {
		stopped[nodes[i].id] = true
	}
	var sent atomic.Int64
	t0 := time.Now().Add(200 * time.Millisecond)
	var wg sync.WaitGroup
	for ci, c := range conns {
		var mine []*simNode
		for i := ci; i < len(nodes); i += len(conns) {
			mine = append(mine, nodes[i])
		}
		slices.SortFunc(mine, func(a, b *simNode) int { return int(a.phase - b.phase) })
		wg.Go(func() {
			for k := range beatsFor(o) {
				for _, n := range mine {
					if stopped[n.id] && k >= stopAt {
						continue
					}
					due := t0.Add(time.Duration(k)*o.interval + n.phase)
					if d := time.Until(due); d > time.Millisecond {
						time.Sleep(d)
					}
					if err := c.Publish(subjects.Heartbeat(n.id), n.beats[k]); err != nil {
						log.Printf("publish: %v", err)
						continue
					}
					now := time.Now().UnixNano()
					if k == 0 {
						n.first.Store(now)
					}
					n.last.Store(now)
					sent.Add(1)
				}
			}
		})
	}

	// Measure over the window.
	time.Sleep(time.Until(t0.Add(o.warmup)))
	backlog0, err := backlog(admin.NC, &sent)
	if err != nil {
		return err
	}
	cpu0, err := procCPU(reg.Process.Pid)
	if err != nil {
		return err
	}
	natsCPU0, _ := procCPU(natsProc.Process.Pid)
	busy0 := machineBusy()
	start := time.Now()
	var series []int64
	for time.Since(start) < o.window {
		time.Sleep(min(5*time.Second, o.window-time.Since(start)))
		b, err := backlog(admin.NC, &sent)
		if err != nil {
			return err
		}
		series = append(series, b)
	}
	elapsed := time.Since(start).Seconds()
	cpu1, err := procCPU(reg.Process.Pid)
	if err != nil {
		return err
	}
	natsCPU1, _ := procCPU(natsProc.Process.Pid)
	busy := (machineBusy() - busy0) / elapsed
	backlog1 := series[len(series)-1]
	rss, hwm := procMem(reg.Process.Pid)
	wg.Wait()
	// Give the last stopped nodes time to be declared left.
	time.Sleep(4 * o.interval)
	st, err := stats(admin.NC)
	if err != nil {
		return err
	}

	mu.Lock()
	var joinLat, leftLat []float64
	for _, n := range nodes {
		if v, ok := visible[n.id]; ok && n.first.Load() > 0 {
			joinLat = append(joinLat, v.Sub(time.Unix(0, n.first.Load())).Seconds())
		}
		if stopped[n.id] {
			if l, ok := left[n.id]; ok {
				leftLat = append(leftLat, l.Sub(time.Unix(0, n.last.Load())).Seconds())
			}
		}
	}
	mu.Unlock()
	slices.Sort(joinLat)
	slices.Sort(leftLat)
	cores := (cpu1 - cpu0) / elapsed
	fig := map[string]float64{
		o.prefix + "_cpu_cores":              round(cores, 3),
		o.prefix + "_rss_mib":                round(float64(rss)/(1<<20), 1),
		o.prefix + "_join_to_visible_s":      round(pct(joinLat, 1), 3),
		o.prefix + "_join_to_visible_p50_s":  round(pct(joinLat, 0.5), 3),
		o.prefix + "_stop_to_left_s":         round(pct(leftLat, 1), 3),
		o.prefix + "_stop_to_left_p50_s":     round(pct(leftLat, 0.5), 3),
		o.prefix + "_lag_growth_msgs":        float64(backlog1 - backlog0),
		o.prefix + "_heartbeats_per_s":       round(float64(o.nodes)/o.interval.Seconds(), 0),
		o.prefix + "_nats_server_cpu_cores":  round((natsCPU1-natsCPU0)/elapsed, 3),
		o.prefix + "_record_writes_per_beat": round(float64(st.RecordWrites)/float64(max(st.HeartbeatsAccepted, 1)), 3),
	}
	fmt.Printf("nodes %d, interval %s, window %.1fs, GOMAXPROCS of the registry %d\n", o.nodes, o.interval, elapsed, runtime.NumCPU())
	fmt.Printf("registry CPU %.3f cores, RSS %.1f MiB (peak %.1f MiB); nats-server CPU %.3f cores\n", cores, float64(rss)/(1<<20), float64(hwm)/(1<<20), (natsCPU1-natsCPU0)/elapsed)
	fmt.Printf("the whole machine was busy %.2f of its %d cores (registry, NATS, simulator and anything else running)\n", busy, runtime.NumCPU())
	fmt.Printf("backlog at window start %d, every 5s %v, growth %d messages\n", backlog0, series, backlog1-backlog0)
	fmt.Printf("join to visible: %d nodes, p50 %.3fs p99 %.3fs max %.3fs\n", len(joinLat), pct(joinLat, 0.5), pct(joinLat, 0.99), pct(joinLat, 1))
	fmt.Printf("stop to left: %d of %d stopped nodes, p50 %.3fs p99 %.3fs max %.3fs\n", len(leftLat), len(stopped), pct(leftLat, 0.5), pct(leftLat, 0.99), pct(leftLat, 1))
	fmt.Printf("registry: %d received, %d accepted, rejected %v, %d record writes, %d nodes live at the end\n", st.HeartbeatsReceived, st.HeartbeatsAccepted, st.Rejected, st.RecordWrites, st.Nodes)
	keys := slices.Sorted(func(yield func(string) bool) {
		for k := range fig {
			if !yield(k) {
				return
			}
		}
	})
	for _, k := range keys {
		fmt.Printf("%s %g\n", k, fig[k])
	}
	if len(joinLat) < o.nodes || len(leftLat) < len(stopped) {
		return fmt.Errorf("only %d of %d nodes became visible, %d of %d stopped nodes left", len(joinLat), o.nodes, len(leftLat), len(stopped))
	}
	return benchfig.Record(fig)
}

// beatsFor is how many heartbeats each node sends: warm-up, window, and a
// tail during which the stopped nodes are declared left.
func beatsFor(o options) int {
	return int((o.warmup+o.window)/o.interval) + 5
}

// presign builds and signs every heartbeat of every node, in parallel.
func presign(o options) ([]*simNode, error) {
	nodes := make([]*simNode, o.nodes)
	t0 := time.Now().UTC()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, runtime.NumCPU())
	for range runtime.NumCPU() {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= o.nodes {
					return
				}
				n, err := newSimNode(i, o, t0)
				if err != nil {
					errs <- err
					return
				}
				nodes[i] = n
			}
		})
	}
	wg.Wait()
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	return nodes, nil
}

func newSimNode(i int, o options, t0 time.Time) (*simNode, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	pub, _ := kp.PublicKey()
	id := fmt.Sprintf("sim-%05d", i)
	n := &simNode{id: id, phase: time.Duration(rand.Int64N(int64(o.interval)))}
	gpu := fmt.Sprintf("GPU-%08x-0000-4000-8000-%012x", i, i)
	first := (i * 4) % 76
	hb := wire.Heartbeat{
		Node: id, Supplier: fmt.Sprintf("supplier-%03d", i%500), Region: []string{"eu-west", "us-east", "ap-south"}[i%3],
		IntervalMS: o.interval.Milliseconds(), State: wire.NodeReady,
		Devices:      []wire.Device{{Index: 0, Kind: "gpu", Name: "NVIDIA A100-SXM4-80GB", UUID: gpu, MemoryTotal: 80 << 30, MemoryFree: 20 << 30, ComputeCapability: "8.0", Utilization: 63, TemperatureC: 61, PowerW: 287}},
		MemoryBudget: 72 << 30, MemoryFree: 12 << 30, Models: []string{"llama-70b"},
		Fragments:    []string{fmt.Sprintf("llama-70b/layer.%d", first), fmt.Sprintf("llama-70b/layer.%d", first+1), fmt.Sprintf("llama-70b/layer.%d", first+2), fmt.Sprintf("llama-70b/layer.%d", first+3)},
		KVTokensFree: 180000, QueueDepth: 2,
		Speed: []wire.SpeedSample{{Model: "llama-70b", DType: "f16", Device: gpu, DecodeTokS: 2400, PrefillTokS: 41000}},
	}
	for k := range beatsFor(o) {
		hb.Seq = uint64(k + 1)
		hb.Time = t0.Add(time.Duration(k) * o.interval)
		hb.PublicKey, hb.Signature = "", ""
		if err := nodesig.SignHeartbeat(&hb, pub, kp.Sign); err != nil {
			return nil, err
		}
		b, err := json.Marshal(&hb)
		if err != nil {
			return nil, err
		}
		n.beats = append(n.beats, b)
	}
	return n, nil
}

// backlog is heartbeats sent but not yet checked by the registry.
func backlog(nc *nats.Conn, sent *atomic.Int64) (int64, error) {
	s0 := sent.Load()
	st, err := stats(nc)
	if err != nil {
		return 0, err
	}
	var rejected uint64
	for _, v := range st.Rejected {
		rejected += v
	}
	return s0 - int64(st.HeartbeatsAccepted+rejected), nil
}

func stats(nc *nats.Conn) (wire.RegistryStats, error) {
	var st wire.RegistryStats
	m, err := nc.Request(subjects.RegistryStats, nil, 5*time.Second)
	if err != nil {
		return st, fmt.Errorf("registry stats: %w", err)
	}
	return st, json.Unmarshal(m.Data, &st)
}

func waitStats(nc *nats.Conn) error {
	var err error
	for range 100 {
		if _, err = stats(nc); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("registry did not start: %w", err)
}

// procCPU is the process's user and system CPU time in seconds.
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name (which may hold spaces) in parentheses.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100, nil // USER_HZ is 100 on Linux
}

// machineBusy is the CPU time, in seconds, all cores spent busy since boot.
func machineBusy() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var busy float64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		x, _ := strconv.ParseFloat(v, 64)
		busy += x
	}
	return busy / 100
}

// procMem returns the process's resident and peak resident memory in bytes.
func procMem(pid int) (rss, hwm int64) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			rss = kb << 10
		case "VmHWM":
			hwm = kb << 10
		}
	}
	return rss, hwm
}

func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return sorted[i]
}

func round(v float64, digits int) float64 {
	s := strconv.FormatFloat(v, 'f', digits, 64)
	r, _ := strconv.ParseFloat(s, 64)
	return r
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func connectRetry(ctx context.Context, url, name string) (*bus.Conn, error) {
	var err error
	for range 100 {
		var c *bus.Conn
		if c, err = bus.Connect(ctx, config.NATS{URL: url}, nil, name); err == nil {
			return c, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil, err
}

func stopProc(p *exec.Cmd) {
	if p.Process == nil {
		return
	}
	_ = p.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = p.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = p.Process.Kill()
		<-done
	}
}
