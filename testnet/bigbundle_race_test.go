//go:build race

package testnet

// raceDetector: rate tests cannot reach their rates under the race detector.
const raceDetector = true
