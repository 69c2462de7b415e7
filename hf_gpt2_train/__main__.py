from hf_gpt2_train.cli import main

if __name__ == "__main__":
    main()
