"""`python -m gpu_runner`: the GPU side of a run (reads LORA_JOB_URL)."""

from gpu_runner.runner import main

if __name__ == "__main__":
    main()
