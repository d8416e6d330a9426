package helix

import (
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strings"
)

//go:embed data
var data embed.FS

// Globals are the workload constants of Helix's throughput model.
type Globals struct {
	BlockSizeTokens      int     `json:"VLLM_BLOCK_SIZE_tokens"`
	AvgInputTokens       int     `json:"AVG_INPUT_LEN_tokens"`
	AvgOutputTokens      int     `json:"AVG_OUTPUT_LEN_tokens"`
	MaxInputTokens       int     `json:"MAX_INPUT_LEN_tokens"`
	DecodeMaxContext     int     `json:"DECODE_PER_TOKEN_MAX_CONTEXT"`
	KVCacheHWM           float64 `json:"KV_CACHE_HWM"`
	FixedPointIterations int     `json:"typical_throughput_fixed_point_iterations"`
}

// MachineParams are Helix's per-model, per-machine constants.
type MachineParams struct {
	// MaxLayers is the most layers the machine may hold.
	MaxLayers int `json:"max_num_layers"`
	// KVBlocks[k] is the number of vLLM KV blocks free with k layers loaded.
	KVBlocks map[string]int `json:"vllm_num_blocks"`
	// PromptMaxRequests[k] and DecodeMaxTokens[k] bound the batch sizes.
	PromptMaxRequests map[string]int `json:"prompt_max_requests"`
	DecodeMaxTokens   map[string]int `json:"decode_max_tokens"`
}

// Model is a Helix model: its constants and every machine's timing tables.
type Model struct {
	Name                string                   `json:"-"`
	DisplayName         string                   `json:"display_name"`
	Layers              int                      `json:"num_layers"`
	TokenBytes          int64                    `json:"token_size_bytes"`
	ActivationBytes     int64                    `json:"activation_size_bytes_per_token"`
	LayerBytes          float64                  `json:"layer_param_bytes"`
	TypicalLayers       map[string]int           `json:"typical_layers_default"`
	TypicalLayersSparse map[string]int           `json:"typical_layers_if_capacity_below_1.2x_layers"`
	PerfSeed            map[string]float64       `json:"normalized_perf_initial"`
	Machines            map[string]MachineParams `json:"machines"`
	Globals             Globals                  `json:"-"`
	// Prompt and Decode are the timing tables by machine type.
	Prompt, Decode map[string]*TimingTable `json:"-"`
}

type paramsFile struct {
	Globals Globals                    `json:"globals"`
	Models  map[string]json.RawMessage `json:"models"`
}

// kvBytesPerTokenLayer is a model's KV cache per token per layer (K and V,
// fp16): LLaMA-2-70B has 8 KV heads of 128, LLaMA-1-30B 52 heads of 128.
func kvBytesPerTokenLayer(model string) int64 {
	switch model {
	case "llama2_70b":
		return 2 * 8 * 128 * 2
	case "llama1_30b":
		return 2 * 6656 * 2
	}
	return 0
}

// Models lists the models with embedded data.
func Models() []string { return []string{"llama1_30b", "llama2_70b"} }

// LoadModel returns the embedded constants and timing tables of a model
// ("llama2_70b" or "llama1_30b").
func LoadModel(name string) (*Model, error) {
	raw, err := data.ReadFile("data/model_machine_params.json")
	if err != nil {
		return nil, err
	}
	var pf paramsFile
	if err := json.Unmarshal(raw, &pf); err != nil {
		return nil, fmt.Errorf("model params: %w", err)
	}
	mraw, ok := pf.Models[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q (have %s)", ErrUnknownModel, name, strings.Join(Models(), ", "))
	}
	m := &Model{Name: name, Globals: pf.Globals}
	if err := json.Unmarshal(mraw, m); err != nil {
		return nil, fmt.Errorf("model %s params: %w", name, err)
	}
	m.Prompt, m.Decode = map[string]*TimingTable{}, map[string]*TimingTable{}
	for typ := range m.Machines {
		dir := path.Join("data", name, strings.ToLower(typ))
		for file, dst := range map[string]map[string]*TimingTable{"prompt_bs2time.csv": m.Prompt, "decode_bs2time.csv": m.Decode} {
			t, err := loadTiming(path.Join(dir, file))
			if err != nil {
				return nil, err
			}
			dst[typ] = t
		}
	}
	return m, nil
}

func loadTiming(p string) (*TimingTable, error) {
	f, err := data.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseTimingTable(f, p)
}

// MachineProfiles returns the embedded machine profiles (Google Cloud
// machines as Helix measured them).
func MachineProfiles() (map[string]MachineProfile, error) {
	f, err := data.Open("data/machine_profiles.ini")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ParseMachineProfiles(f, "machine_profiles.ini")
}

// License returns the licence of the embedded Helix data (Apache-2.0).
func License() string {
	b, _ := fs.ReadFile(data, "data/LICENSE")
	return string(b)
}

// typeRank is a machine type's place in the order Helix lists them (-1:
// unknown); sums over a machine mix run in this order.
func typeRank(t string) int {
	return slices.Index([]string{"A100", "V100", "L4", "L4x2", "T4", "T4x2", "T4x4"}, t)
}

func compareTypes(a, b string) int {
	ia, ib := typeRank(a), typeRank(b)
	switch {
	case ia >= 0 && ib >= 0:
		return ia - ib
	case ia >= 0:
		return -1
	case ib >= 0:
		return 1
	}
	return strings.Compare(a, b)
}
