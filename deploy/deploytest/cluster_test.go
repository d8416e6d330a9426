package deploytest

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tessera-grid/tessera/deploy/accounts"
	"github.com/tessera-grid/tessera/internal/proctest"
	"github.com/tessera-grid/tessera/pkg/bus"
	"github.com/tessera-grid/tessera/pkg/subjects"
)

// startCluster starts deploy/nats/cluster/nats-{1,2,3}.conf as three
// processes on loopback, the host names and ports of the shipped files
// replaced by free loopback ports. It returns the servers and the
// comma-separated client URLs.
func startCluster(t *testing.T, g *grid) ([]*natsServer, string) {
	t.Helper()
	const n = 3
	ports := freePorts(t, 4*n)
	client, http, route, leaf := ports[:n], ports[n:2*n], ports[2*n:3*n], ports[3*n:]
	var routes []string
	for i := range n {
		routes = append(routes, fmt.Sprintf("nats-route://nats-%d:6222", i+1), fmt.Sprintf("nats-route://127.0.0.1:%d", route[i]))
	}
	// accounts.conf goes next to each server's configuration file.
	tool(t, "-dir", g.secrets.Dir(), "server-config", "-o", filepath.Join(g.confDir, "cluster", "accounts.conf"))
	var servers []*natsServer
	var urls []string
	for i := range n {
		name := fmt.Sprintf("nats-%d", i+1)
		conf := filepath.Join(g.confDir, "cluster", name+".conf")
		edits := append([]string{
			"listen: 0.0.0.0:4222", fmt.Sprintf("listen: 127.0.0.1:%d", client[i]),
			"http: 127.0.0.1:8222", fmt.Sprintf("http: 127.0.0.1:%d", http[i]),
			`store_dir: "/var/lib/nats/jetstream"`, fmt.Sprintf("store_dir: %q", filepath.Join(g.dir, name)),
			"listen: 0.0.0.0:6222", fmt.Sprintf("listen: 127.0.0.1:%d", route[i]),
			"listen: 0.0.0.0:7422", fmt.Sprintf("listen: 127.0.0.1:%d", leaf[i]),
		}, routes...)
		proctest.Localise(t, "cluster/"+name+".conf", conf, edits...)
		servers = append(servers, startNATS(t, name, conf, client[i]))
		urls = append(urls, servers[i].URL)
	}
	for _, s := range servers {
		s.waitReady(t)
	}
	return servers, strings.Join(urls, ",")
}

// TestClusterFromDeployFiles follows the walkthrough for three machines:
// accounts, the three servers from deploy/nats/cluster, bootstrap with
// NATS_REPLICAS=3. Every stream, bucket and the object store has three
// replicas, and with one server killed publishing usage, writing plans and
// watching them still work.
func TestClusterFromDeployFiles(t *testing.T) {
	g := newGrid(t)
	servers, urls := startCluster(t, g)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin := connect(t, "admin", g.natsConfig(t, urls, accounts.RoleAdmin, "ops"))
	// The cluster serves JetStream once it has elected a meta leader.
	checkFor(t, 30*time.Second, 50*time.Millisecond, func() error {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := admin.JS.AccountInfo(actx)
		return err
	})
	t.Setenv("NATS_URL", urls)
	t.Setenv("NATS_CREDS", g.issue(t, accounts.RoleAdmin, "bootstrap"))
	t.Setenv("NATS_REPLICAS", "3")
	tool(t, "bootstrap")

	var streams []string
	for _, sc := range bus.Streams(3) {
		streams = append(streams, sc.Name)
	}
	for _, kc := range bus.Buckets(3) {
		streams = append(streams, "KV_"+kc.Bucket)
	}
	streams = append(streams, "OBJ_"+subjects.ObjectFragments)
	usageLeader := ""
	for _, name := range streams {
		var info *jetstream.StreamInfo
		checkFor(t, 20*time.Second, 50*time.Millisecond, func() error {
			st, err := admin.JS.Stream(ctx, name)
			if err != nil {
				return err
			}
			info = st.CachedInfo()
			if info.Config.Replicas != 3 {
				return fmt.Errorf("stream %s has %d replicas, want 3", name, info.Config.Replicas)
			}
			if info.Cluster == nil || info.Cluster.Leader == "" || len(info.Cluster.Replicas) != 2 {
				return fmt.Errorf("stream %s: cluster %+v, want a leader and 2 replicas", name, info.Cluster)
			}
			return nil
		})
		if name == subjects.StreamUsage {
			usageLeader = info.Cluster.Leader
		}
	}

	// Kill the server leading stream USAGE, as a machine failure would.
	var killed *natsServer
	for _, s := range servers {
		if s.Name == usageLeader {
			killed = s
		}
	}
	if killed == nil {
		t.Fatalf("USAGE leader %q is none of the servers", usageLeader)
	}
	killed.kill()

	node := connect(t, "n1", g.natsConfig(t, urls, accounts.RoleExecutor, "n1"))
	planner := connect(t, "planner", g.natsConfig(t, urls, accounts.RolePlanner, "planner-1"))
	checkFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, err := node.JS.Publish(pctx, subjects.UsageNode("n1"), []byte(`{"node":"n1"}`))
		return err
	})
	var plans jetstream.KeyValue
	checkFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		kv, err := planner.JS.KeyValue(pctx, subjects.BucketPlans)
		if err != nil {
			return err
		}
		if _, err := kv.Put(pctx, "m", []byte(`{"model":"m"}`)); err != nil {
			return err
		}
		plans = kv
		return nil
	})
	// An executor still sees the plan through a watch. A request that
	// reaches the cluster while it elects new leaders may go unanswered;
	// like the services, the test asks again (nats.go bounds each attempt).
	kv, err := node.JS.KeyValue(ctx, subjects.BucketPlans)
	if err != nil {
		t.Fatal(err)
	}
	checkFor(t, 30*time.Second, 10*time.Millisecond, func() error {
		wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		w, err := kv.Watch(wctx, "m")
		if err != nil {
			return err
		}
		defer w.Stop()
		select {
		case e := <-w.Updates():
			if e == nil || string(e.Value()) != `{"model":"m"}` {
				return fmt.Errorf("watched %v", e)
			}
			return nil
		case <-wctx.Done():
			return errors.New("no plan seen by the executor")
		}
	})
	st, err := admin.JS.Stream(ctx, subjects.StreamUsage)
	if err != nil {
		t.Fatal(err)
	}
	if info := st.CachedInfo(); info.Cluster.Leader == killed.Name || info.State.Msgs == 0 {
		t.Fatalf("USAGE after the kill: leader %s, %d messages", info.Cluster.Leader, info.State.Msgs)
	}
	if e, err := plans.Get(ctx, "m"); err != nil || e.Revision() == 0 {
		t.Fatalf("plan after the kill: %v %v", e, err)
	}
	node.noViolations(t)
	planner.noViolations(t)
}
