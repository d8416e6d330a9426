// Package testmodel locates the demo model (models/stories260k) in the
// source tree and holds upstream llama2.c's exact outputs for it, so that
// every test that checks generated tokens compares against the same reference.
package testmodel

import (
	"fmt"
	"os"
	"path/filepath"
)

// Model file names inside models/stories260k.
const (
	CheckpointFile = "stories260K.bin"
	TokenizerFile  = "tok512.bin"
	// ID is the model id the grid serves the demo model under.
	ID = "stories260k"
	// Prompt is the reference prompt.
	Prompt = "Once upon a time"
)

// PromptIDs is llama2.c's encoding of Prompt (BOS first).
var PromptIDs = []int{1, 403, 407, 261, 378}

// GreedyIDs are the 60 tokens llama2.c's run.c generates greedily after
// PromptIDs (`run stories260K.bin -z tok512.bin -t 0 -n 64 -i "Once upon a time"`).
var GreedyIDs = []int{432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352, 266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415, 426, 13, 438, 310}

// GreedyText is the text of GreedyIDs, as a completion of Prompt.
const GreedyText = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily"

// GreedyTopLogits are run.c's top-1 logits at each of the 60 greedy steps.
var GreedyTopLogits = []float32{17.79940, 18.60512, 17.75609, 19.51595, 13.40306, 16.95144, 15.60530, 20.51946, 15.62993, 18.05027, 15.83755, 17.45652, 17.12541, 21.96756, 18.25979, 14.63701, 16.43072, 15.74510, 18.65961, 19.09342, 20.54717, 16.33168, 16.04842, 13.05913, 17.92683, 16.98189, 13.74089, 18.63123, 15.41191, 17.65968, 17.32612, 13.82387, 18.53497, 12.03780, 13.17499, 13.62579, 14.95419, 13.75672, 13.32600, 10.94515, 16.15550, 14.12180, 20.73941, 19.59549, 13.43080, 17.04342, 16.93681, 14.61205, 17.87969, 15.64480, 16.53361, 16.94538, 18.21647, 14.92985, 16.65770, 18.47164, 13.53927, 16.11366, 15.24854, 19.27319}

// SampledText is what run.c prints for `-t 1.0 -p 0.9 -s 133742` with an
// empty prompt (256 positions), trailing newline excluded.
const SampledText = "Once upon a time, there was a little boy named Timmy. Timmy loved to play with his toys and eat sandwiches. One day, Timmy's mom told him it was time to rest for a while. Timmy's friend Billy came over and took him a down.\nTimmy's mom saw that Timmy was sad, but Timmy said, \"I didn't understand what is it! We need to find some leafs.\" Timmy thought about it and took a deep breath on a spoon. He hoped it was important to be kind and continued to find its image next time.\nAfter they finished getting, Timmy's dad came up to his house and promised to help Timmy."

// Dir returns the directory holding the demo model, found by walking up
// from the working directory to the repository root (the one with go.work).
func Dir() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		p := filepath.Join(d, "models", "stories260k")
		if _, err := os.Stat(filepath.Join(p, CheckpointFile)); err == nil {
			return p, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("models/stories260k not found above %s", wd)
		}
	}
}

// Paths returns the checkpoint and tokenizer paths of the demo model.
func Paths() (checkpoint, tokenizer string, err error) {
	d, err := Dir()
	if err != nil {
		return "", "", err
	}
	return filepath.Join(d, CheckpointFile), filepath.Join(d, TokenizerFile), nil
}
