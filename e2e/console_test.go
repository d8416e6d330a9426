package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/tessera-grid/tessera/internal/local"
	"github.com/tessera-grid/tessera/internal/proctest"
	"github.com/tessera-grid/tessera/pkg/bus/bustest"
	"github.com/tessera-grid/tessera/pkg/testmodel"
)

// chromium returns the path of a Chromium (or Chrome) binary, skipping the
// test when there is none.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "headless-shell"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("no Chromium binary (install Debian's chromium package: apt-get install -y chromium)")
	return ""
}

// artifactDir is where tests leave files for people to look at:
// $TESSERA_ARTIFACTS, or var/artifacts in the repository (ignored by git).
func artifactDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("TESSERA_ARTIFACTS")
	if dir == "" {
		dir = filepath.Join(proctest.RepoRoot(t), "var", "artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The operator console, loaded in headless Chromium against a running grid,
// shows the nodes, their devices and the plan; a node that joins appears.
// The screenshot is saved for a look.
func TestConsoleInChromium(t *testing.T) {
	o := testOptions(t)
	o.Executors = 2
	o.Router.HTTPAddr = "127.0.0.1:0"
	o.Router.ConsoleAddr = "127.0.0.1:0"
	o.Router.AnonymousCustomer = "tester"
	o.Planner.Strategy = "exo"
	if proctest.ClickHouseInstalled(t) {
		o.NoSettlement = false
		o.Settlement.ClickHouseAddr, o.Settlement.ClickHouseDatabase = []string{proctest.ClickHouse(t)}, "tessera_console"
	} else {
		t.Log("ClickHouse is not installed: the console shows settlement as not answering")
	}
	g, base := startGridWith(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	caddr, err := g.ConsoleAddr(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The page's data, as any client reads it.
	bustest.CheckFor(t, 30*time.Second, 100*time.Millisecond, func() error {
		var st struct {
			Nodes  []struct{ ID string } `json:"nodes"`
			Models []struct {
				ID   string          `json:"id"`
				Plan json.RawMessage `json:"plan"`
			} `json:"models"`
		}
		resp, err := http.Get("http://" + caddr + "/console/api/state")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			return err
		}
		if len(st.Nodes) != 2 || len(st.Models) != 1 || st.Models[0].ID != testmodel.ID || len(st.Models[0].Plan) < 10 {
			return fmt.Errorf("console state: %d nodes, models %+v", len(st.Nodes), st.Models)
		}
		return nil
	})
	chrome := chromium(t)
	// Some traffic, so that throughput and settlement have something to show.
	var wg sync.WaitGroup
	trafficCtx, stopTraffic := context.WithCancel(ctx)
	defer func() { stopTraffic(); wg.Wait() }()
	wg.Go(func() {
		for trafficCtx.Err() == nil {
			req, _ := http.NewRequestWithContext(trafficCtx, http.MethodPost, base+"/v1/completions",
				strings.NewReader(`{"model":"stories260k","prompt":"Once upon a time","max_tokens":20,"temperature":0}`))
			if resp, err := http.DefaultClient.Do(req); err == nil {
				resp.Body.Close()
			}
		}
	})

	// The defaults run headless without first-run, background networking
	// or sync; this machine's network is closed, so nothing else either.
	opts := append(slices.Clone(chromedp.DefaultExecAllocatorOptions[:]),
		chromedp.ExecPath(chrome),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.WindowSize(1440, 1300),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	defer cancelBrowser()

	// Script errors of the page are part of a failure's report.
	var jsMu sync.Mutex
	var jsErrors []string
	exceptions := chromedp.Events(bctx, runtime.ExceptionThrown)
	go func() {
		for ev, err := range exceptions {
			if err != nil {
				return
			}
			jsMu.Lock()
			jsErrors = append(jsErrors, (&chromedp.ExceptionError{ExceptionDetails: ev.ExceptionDetails}).Error())
			jsMu.Unlock()
		}
	}()
	url := "http://" + caddr + "/console/"
	wait := func(what, selector string, timeout time.Duration) {
		t.Helper()
		wctx, cancel := context.WithTimeout(bctx, timeout)
		defer cancel()
		if err := chromedp.Do(wctx, chromedp.WaitVisible(chromedp.CSS(selector))); err != nil {
			body, _ := chromedp.Run(bctx, chromedp.Text(chromedp.CSS("body")))
			jsMu.Lock()
			defer jsMu.Unlock()
			t.Fatalf("console at %s: %s (%s) not shown: %v\nscript errors: %q\npage text:\n%s", url, what, selector, err, jsErrors, body)
		}
	}
	if err := chromedp.Do(bctx, chromedp.Navigate(url)); err != nil {
		t.Fatalf("load %s: %v", url, err)
	}
	for i := 1; i <= 2; i++ {
		wait("executor "+local.ExecutorName(i), fmt.Sprintf(`#nodes tr[data-node=%q]`, local.ExecutorName(i)), 30*time.Second)
	}
	wait("the plan as a picture", fmt.Sprintf(`.plan[data-model=%q] svg rect`, testmodel.ID), 30*time.Second)
	devices, err := chromedp.Run(bctx, chromedp.Text(chromedp.CSS(fmt.Sprintf(`#nodes tr[data-node=%q]`, local.ExecutorName(1)))))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(devices, "CPU 0") || !strings.Contains(devices, "busy") {
		t.Fatalf("node row shows no device utilization: %q", devices)
	}

	// A node joins: it appears, and the planner's re-plan shows.
	if err := g.StartExecutor(3); err != nil {
		t.Fatal(err)
	}
	wait("the new executor", fmt.Sprintf(`#nodes tr[data-node=%q]`, local.ExecutorName(3)), time.Minute)
	wait("its join", `#events tr[data-kind="joined"]`, 30*time.Second)
	wait("a re-plan", `#events tr[data-kind="plan"]`, 30*time.Second)
	wait("throughput", `#throughput svg rect`, 30*time.Second)
	if !o.NoSettlement {
		// The page says how far behind settlement is once it answers.
		wait("settlement's lag", `#settlement dl`, 30*time.Second)
	}
	// Take the picture after the page has drawn a state that has all this.
	updated, err := chromedp.Run(bctx, chromedp.Evaluate[string](`document.body.dataset.updated`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Run(bctx, chromedp.Poll[bool](fmt.Sprintf(`document.body.dataset.updated !== %q`, updated),
		chromedp.WithPollingTimeout(10*time.Second))); err != nil {
		t.Fatalf("the page stopped refreshing: %v", err)
	}
	png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(artifactDir(t), "console.png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("console screenshot: %s (%d bytes)", path, len(png))
}
