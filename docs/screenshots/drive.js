// Drive the Train LoRA tab in headless Chromium: load, tag, prepare, train, screenshot.
const { chromium } = require('playwright-core');  // NODE_PATH may point at its node_modules
const url = process.argv[2], out = process.argv[3];
const photos = process.env.LT_PHOTOS || '/tmp/lt-demo/photos', tagger = process.env.LT_TAGGER || '/tmp/lt-demo/tagger';
(async () => {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(240000);
  await page.goto(url);
  const fill = async (id, v) => { const el = page.locator(`#${id} textarea, #${id} input`).first(); await el.fill(String(v)); await el.press('Tab'); };
  const click = async (id) => { await page.locator(`#${id}`).first().click(); };
  const step = (m) => console.log(new Date().toISOString(), m);
  await fill('lora_trainer_folder', photos);
  await click('lora_trainer_load');
  await page.waitForFunction(() => document.querySelectorAll('#lora_trainer_gallery img').length >= 6);
  step('gallery loaded');
  await page.locator('#lora_trainer_tag_section').getByText('2. Auto-tag').click();
  const dd = page.locator('#lora_trainer_tagger_model input').first();
  await dd.fill(tagger); await dd.press('Enter');
  await fill('lora_trainer_trigger', 'shape');
  await click('lora_trainer_tag_run');
  await page.waitForFunction(() => (document.querySelector('#lora_trainer_tag_status')?.innerText || '').includes('done'));
  step('tagged: ' + await page.locator('#lora_trainer_tag_status').first().innerText());
  await page.locator('#lora_trainer_caption_section').getByText('3. Captions').click();
  await page.locator('#lora_trainer_gallery img').first().click();
  await page.waitForFunction(() => (document.querySelector('#lora_trainer_caption textarea')?.value || '').length > 0);
  step('caption: ' + await page.locator('#lora_trainer_caption textarea').first().inputValue());
  await fill('lora_trainer_concept', 'shape');
  await fill('lora_trainer_repeats', 1);
  await click('lora_trainer_prepare');
  await page.waitForFunction(() => (document.querySelector('#lora_trainer_prepare_status')?.innerText || '').includes('Prepared'));
  step('prepared');
  await fill('lora_trainer_name', 'shapes');
  await fill('lora_trainer_epochs', 3);
  await fill('lora_trainer_resolution', 64);
  await fill('lora_trainer_rank', 4);
  await fill('lora_trainer_lr', 0.001);
  await page.locator('#lora_trainer_advanced').getByText('Samples and advanced').click();
  await fill('lora_trainer_sample_prompt', 'shape, circle');
  await fill('lora_trainer_extra', '{"min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "sample_steps": 4}');
  await click('lora_trainer_plan');
  await page.waitForFunction(() => (document.querySelector('#lora_trainer_plan_info')?.innerText || '').length > 10);
  step('plan: ' + await page.locator('#lora_trainer_plan_info').first().innerText());
  await click('lora_trainer_train');
  await page.waitForFunction(() => /step \d+\/\d+/.test(document.querySelector('#lora_trainer_progress')?.innerText || ''));
  step('progress: ' + await page.locator('#lora_trainer_progress').first().innerText());
  await page.waitForFunction(() => /LoRA ready|failed|Stopped/.test(document.querySelector('#lora_trainer_result')?.innerText || ''));
  step('result: ' + await page.locator('#lora_trainer_result').first().innerText());
  step('send text: ' + await page.locator('#lora_trainer_send_text textarea').first().inputValue().catch(() => '(hidden)'));
  await page.waitForTimeout(1500);
  await page.screenshot({ path: out, fullPage: true });
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
